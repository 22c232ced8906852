"""The wrapped data key record and the canonical encoding of key contexts.

A ``WrappedKey`` is what sits in an object header and in key events: which provider and KEK
(id + version) wrapped a DEK, and the wrapped bytes.  Its binary and JSON encodings are stable
(version byte first) so headers written today stay readable.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from enclave_common.crypto.errors import KeyFormatError

KeyContext = Mapping[str, str]
"""Non-secret strings a data key is bound to (e.g. tenant and study key); AAD of every wrap."""

_WRAPPED_KEY_ENCODING_VERSION = 1
_MAX_CIPHERTEXT = 4096


def encode_key_context(context: KeyContext) -> bytes:
    """Canonical bytes of a key context: UTF-8 JSON with sorted keys and no whitespace."""
    for name, value in context.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise KeyFormatError("key context keys and values must be str")
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data encryption key wrapped by a KEK.

    ``key_version`` is the KEK version for providers that version keys themselves (the local
    keyring, >= 1); 0 means the provider manages versions internally (AWS KMS rotates backing keys
    under one key id).
    """

    provider: str
    key_id: str
    key_version: int
    ciphertext: bytes

    def __post_init__(self) -> None:
        if not self.provider or not self.provider.isascii() or len(self.provider) > 255:
            raise KeyFormatError("WrappedKey.provider must be 1-255 ASCII characters")
        if not self.key_id or len(self.key_id.encode()) > 0xFFFF:
            raise KeyFormatError("WrappedKey.key_id must be 1-65535 UTF-8 bytes")
        if not 0 <= self.key_version <= 0xFFFFFFFF:
            raise KeyFormatError("WrappedKey.key_version must be in 0..2**32-1")
        if not 0 < len(self.ciphertext) <= _MAX_CIPHERTEXT:
            raise KeyFormatError(f"WrappedKey.ciphertext must be 1-{_MAX_CIPHERTEXT} bytes")

    def to_bytes(self) -> bytes:
        """Stable binary encoding used inside object headers (see docs/crypto-format.md)."""
        provider = self.provider.encode("ascii")
        key_id = self.key_id.encode()
        return b"".join(
            (
                struct.pack(">BB", _WRAPPED_KEY_ENCODING_VERSION, len(provider)),
                provider,
                struct.pack(">H", len(key_id)),
                key_id,
                struct.pack(">IH", self.key_version, len(self.ciphertext)),
                self.ciphertext,
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> WrappedKey:
        """Parse ``to_bytes`` output; the whole buffer must be consumed."""
        view = memoryview(data)
        try:
            version, provider_len = struct.unpack_from(">BB", view, 0)
            if version != _WRAPPED_KEY_ENCODING_VERSION:
                raise KeyFormatError(
                    f"wrapped key encoding version {version} is not supported; supported: "
                    f"{_WRAPPED_KEY_ENCODING_VERSION}"
                )
            offset = 2
            provider = bytes(view[offset : offset + provider_len]).decode("ascii")
            offset += provider_len
            (key_id_len,) = struct.unpack_from(">H", view, offset)
            offset += 2
            key_id = bytes(view[offset : offset + key_id_len]).decode()
            offset += key_id_len
            key_version, ct_len = struct.unpack_from(">IH", view, offset)
            offset += 6
            ciphertext = bytes(view[offset : offset + ct_len])
        except (struct.error, UnicodeDecodeError) as exc:
            raise KeyFormatError("wrapped key encoding is truncated or not UTF-8") from exc
        if len(ciphertext) != ct_len or offset + ct_len != len(view):
            raise KeyFormatError("wrapped key encoding has the wrong length")
        return cls(provider=provider, key_id=key_id, key_version=key_version, ciphertext=ciphertext)

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-safe form for events and key registries (ciphertext as standard base64)."""
        return {
            "provider": self.provider,
            "key_id": self.key_id,
            "key_version": self.key_version,
            "ciphertext": base64.b64encode(self.ciphertext).decode("ascii"),
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> WrappedKey:
        """Parse ``to_json_dict`` output, rejecting missing fields and invalid base64."""
        try:
            ciphertext = base64.b64decode(data["ciphertext"], validate=True)
            return cls(
                provider=str(data["provider"]),
                key_id=str(data["key_id"]),
                key_version=int(data["key_version"]),
                ciphertext=ciphertext,
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise KeyFormatError(
                "wrapped key JSON needs provider, key_id, key_version (int) and ciphertext (base64)"
            ) from exc

    def __repr__(self) -> str:
        return (
            f"WrappedKey(provider={self.provider!r}, key_id={self.key_id!r}, "
            f"key_version={self.key_version}, ciphertext=<{len(self.ciphertext)} bytes>)"
        )
