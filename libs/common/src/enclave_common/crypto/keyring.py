"""A local, versioned KEK keyring for development, tests and single-host deployments.

Wrapping is AES-256-GCM (cryptography's AESGCM) rather than AES-KW (RFC 3394): AES-KW has no
associated data, and we need the key context (tenant, study) and the KEK id/version bound to the
wrapped DEK so that a wrapped key copied to another study or relabelled with another version fails
to unwrap.  Wrapped form: 12-byte random nonce || ciphertext || 16-byte tag (60 bytes for a DEK).
With random 96-bit nonces one KEK version should wrap fewer than 2**32 DEKs; rotate long before.

The JSON file format and the atomic save (temp file + fsync + rename, mode 0600) are written here
by hand: no library provides a keyring file.  Plaintext KEKs on disk are for dev only; production
uses ``AwsKmsProvider``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave_common.crypto.errors import (
    KeyFormatError,
    KeyNotFoundError,
    KeyRetiredError,
    KeyUnwrapError,
)
from enclave_common.crypto.providers import DATA_KEY_BYTES
from enclave_common.crypto.wrapped_key import KeyContext, WrappedKey, encode_key_context

LOCAL_PROVIDER = "local"
KEYRING_FORMAT = "enclave.keyring.v1"
_KEK_BYTES = 32
_NONCE_BYTES = 12
_WRAP_LABEL = b"enclave.local-keyring.wrap.v1\x00"


def _decode_key_b64(value: str, what: str) -> bytes:
    """Decode a base64 (standard or URL-safe, padding optional) 32-byte key, strictly."""
    text = value.strip()
    padded = text + "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError(f"{what} is not valid base64; expected base64 of exactly 32 bytes") from exc
    if len(raw) != _KEK_BYTES:
        raise KeyFormatError(f"{what} decodes to {len(raw)} bytes; expected exactly 32 (AES-256)")
    return raw


@dataclass(slots=True)
class LocalKeyring:
    """Versioned AES-256 KEKs held in memory; implements ``KeyEncryptionKeyProvider``.

    ``versions`` maps version number (>= 1) to the 32-byte KEK; ``retired`` lists version numbers
    whose key material was destroyed (crypto-shredding every DEK wrapped under them).
    """

    key_id: str
    versions: dict[int, bytes]
    current_version: int
    retired: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.key_id or "#" in self.key_id:
            raise KeyFormatError("keyring key_id must be non-empty and must not contain '#'")
        for version, key in self.versions.items():
            if version < 1:
                raise KeyFormatError(f"KEK versions start at 1; got {version}")
            if len(key) != _KEK_BYTES:
                raise KeyFormatError(f"KEK version {version} must be 32 bytes; got {len(key)}")
        if self.current_version not in self.versions:
            raise KeyFormatError(f"current KEK version {self.current_version} is not in the keyring")
        if self.retired & self.versions.keys():
            raise KeyFormatError("a KEK version cannot be both present and retired")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def generate(cls, key_id: str = "local") -> LocalKeyring:
        """A new keyring with one random KEK as version 1."""
        return cls(key_id=key_id, versions={1: AESGCM.generate_key(256)}, current_version=1)

    @classmethod
    def from_env_value(cls, value: str, key_id: str = "local") -> LocalKeyring:
        """Keyring from the seed's ``IMAGING_ENCRYPTION_KEY`` style value: base64 of a 32-byte key.

        The key becomes version 1.  Anything that is not strictly base64 of exactly 32 bytes is
        rejected (no truncation, padding or hashing of a passphrase); the value is never echoed.
        """
        return cls(
            key_id=key_id, versions={1: _decode_key_b64(value, "encryption key value")}, current_version=1
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> LocalKeyring:
        """Parse the keyring JSON format (see docs/crypto-format.md)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyFormatError("keyring file is not valid JSON") from exc
        if not isinstance(data, dict) or data.get("format") != KEYRING_FORMAT:
            raise KeyFormatError(f"keyring file must be a JSON object with format={KEYRING_FORMAT!r}")
        try:
            versions = {
                int(number): _decode_key_b64(str(entry["key"]), f"KEK version {number}")
                for number, entry in dict(data["versions"]).items()
            }
            return cls(
                key_id=str(data["key_id"]),
                versions=versions,
                current_version=int(data["current_version"]),
                retired={int(v) for v in data.get("retired", [])},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyFormatError(
                "keyring file needs key_id, current_version and versions {number: {key: base64}}"
            ) from exc

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LocalKeyring:
        """Read a keyring JSON file."""
        return cls.from_json(Path(path).read_bytes())

    # ---- persistence --------------------------------------------------------------------------

    def to_json(self) -> str:
        """The keyring JSON document (contains plaintext KEKs: handle as a secret)."""
        document: dict[str, Any] = {
            "format": KEYRING_FORMAT,
            "key_id": self.key_id,
            "current_version": self.current_version,
            "versions": {
                str(v): {"key": base64.b64encode(k).decode("ascii")} for v, k in sorted(self.versions.items())
            },
            "retired": sorted(self.retired),
        }
        return json.dumps(document, indent=2) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: temp file (mode 0600) in the same directory, fsync, rename, fsync dir."""
        target = Path(path)
        directory = target.parent
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(self.to_json())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # ---- lifecycle ----------------------------------------------------------------------------

    def rotate(self) -> int:
        """Add a new random KEK version and make it current; returns the new version number."""
        new_version = max(self.versions.keys() | self.retired) + 1
        self.versions[new_version] = AESGCM.generate_key(256)
        self.current_version = new_version
        return new_version

    def retire(self, version: int) -> None:
        """Destroy a non-current KEK version: every DEK wrapped under it becomes unrecoverable."""
        if version == self.current_version:
            raise KeyFormatError(f"KEK version {version} is current; rotate() before retiring it")
        if version not in self.versions:
            raise KeyNotFoundError(f"KEK version {version} of keyring {self.key_id!r} is not held")
        del self.versions[version]
        self.retired.add(version)

    # ---- KeyEncryptionKeyProvider -------------------------------------------------------------

    @property
    def current_key_id(self) -> str:
        return f"{self.key_id}#v{self.current_version}"

    def generate_data_key(self, context: KeyContext) -> tuple[bytes, WrappedKey]:
        dek = secrets.token_bytes(DATA_KEY_BYTES)
        return dek, self._wrap(dek, self.current_version, context)

    def unwrap(self, wrapped: WrappedKey, context: KeyContext) -> bytes:
        kek = self._kek_for(wrapped)
        if len(wrapped.ciphertext) <= _NONCE_BYTES:
            raise KeyUnwrapError("wrapped key ciphertext is too short for the local keyring format")
        nonce, sealed = wrapped.ciphertext[:_NONCE_BYTES], wrapped.ciphertext[_NONCE_BYTES:]
        try:
            dek = AESGCM(kek).decrypt(nonce, sealed, self._wrap_aad(wrapped.key_version, context))
        except InvalidTag as exc:
            raise KeyUnwrapError(
                f"wrapped key did not authenticate under {self.key_id!r} version {wrapped.key_version}: "
                "wrong key context, wrong keyring, or tampered ciphertext"
            ) from exc
        if len(dek) != DATA_KEY_BYTES:
            raise KeyUnwrapError("unwrapped data key is not 32 bytes")
        return dek

    def rewrap(self, wrapped: WrappedKey, context: KeyContext) -> WrappedKey:
        if wrapped.key_version == self.current_version and wrapped.key_id == self.key_id:
            self.unwrap(wrapped, context)
            return wrapped
        return self._wrap(self.unwrap(wrapped, context), self.current_version, context)

    # ---- internals ----------------------------------------------------------------------------

    def _kek_for(self, wrapped: WrappedKey) -> bytes:
        if wrapped.provider != LOCAL_PROVIDER or wrapped.key_id != self.key_id:
            raise KeyNotFoundError(
                f"wrapped key names provider {wrapped.provider!r} key {wrapped.key_id!r}; this keyring is "
                f"{LOCAL_PROVIDER!r} key {self.key_id!r}"
            )
        if wrapped.key_version in self.retired:
            raise KeyRetiredError(
                f"KEK version {wrapped.key_version} of keyring {self.key_id!r} was retired; data keys "
                "wrapped under it are crypto-shredded"
            )
        kek = self.versions.get(wrapped.key_version)
        if kek is None:
            raise KeyNotFoundError(
                f"KEK version {wrapped.key_version} of keyring {self.key_id!r} is unknown; held versions: "
                f"{sorted(self.versions)}"
            )
        return kek

    def _wrap_aad(self, version: int, context: Mapping[str, str]) -> bytes:
        return b"".join(
            (
                _WRAP_LABEL,
                self.key_id.encode(),
                b"\x00",
                version.to_bytes(4, "big"),
                encode_key_context(context),
            )
        )

    def _wrap(self, dek: bytes, version: int, context: KeyContext) -> WrappedKey:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = AESGCM(self.versions[version]).encrypt(nonce, dek, self._wrap_aad(version, context))
        return WrappedKey(
            provider=LOCAL_PROVIDER, key_id=self.key_id, key_version=version, ciphertext=nonce + sealed
        )

    def __repr__(self) -> str:
        return (
            f"LocalKeyring(key_id={self.key_id!r}, versions={sorted(self.versions)}, "
            f"current_version={self.current_version}, retired={sorted(self.retired)})"
        )
