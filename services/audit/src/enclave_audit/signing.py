"""Ed25519 signing of checkpoints and evidence bundles (``cryptography``).

The signer is a small Protocol so a KMS- or HSM-held key can replace the local key later. Key ids
are derived from the public key, so a verifier can tell which key a document claims without
trusting anything but the key it was given.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class Signer(Protocol):
    """Something that signs bytes with Ed25519 and names its key."""

    @property
    def key_id(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


def ed25519_key_id(public_key: Ed25519PublicKey) -> str:
    """``ed25519:`` and the first 16 hex digits of SHA-256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


class Ed25519Signer:
    """A signer holding an Ed25519 private key in process memory (dev, tests, or a mounted secret)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_key = private_key.public_key()
        self._key_id = ed25519_key_id(self.public_key)

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes, password: bytes | None = None) -> Ed25519Signer:
        key = serialization.load_pem_private_key(pem, password=password)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"signing key is {type(key).__name__}; only Ed25519 private keys are accepted")
        return cls(key)

    @property
    def key_id(self) -> str:
        return self._key_id

    def sign(self, message: bytes) -> bytes:
        return self._private_key.sign(message)

    def public_key_pem(self) -> bytes:
        return public_key_pem(self.public_key)


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM, the form handed to third-party verifiers."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return public_key.public_bytes(serialization.Encoding.PEM, spki)


def load_public_key_pem(pem: bytes) -> Ed25519PublicKey:
    """Load a verifier's public key; anything but Ed25519 is refused."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"public key is {type(key).__name__}; only Ed25519 public keys are accepted")
    return key


def trusted_keys(own: Ed25519PublicKey | None, directory: Path | None) -> dict[str, Ed25519PublicKey]:
    """The public keys whose checkpoints are genuine, by key id: ``own`` (the signing key's) and
    every ``*.pem`` in ``directory`` (the keys signing used before a rotation, or the next one)."""
    keys = {ed25519_key_id(own): own} if own is not None else {}
    for path in sorted(directory.glob("*.pem")) if directory is not None else ():
        try:
            key = load_public_key_pem(path.read_bytes())
        except ValueError as exc:
            raise ValueError(f"{path}: not an Ed25519 public key in PEM ({exc})") from None
        keys[ed25519_key_id(key)] = key
    return keys


def verify_signature(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` under ``public_key``."""
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
