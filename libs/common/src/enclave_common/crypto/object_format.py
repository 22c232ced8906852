"""The at-rest object format: object identity, versioned header, nonces and segment AAD.

Byte layout (docs/crypto-format.md has the full description and test vectors)::

    header  = magic "ENCO" | version u8 (1) | flags u8 (0) | segment size u32 BE
              | nonce prefix (7) | key slot length u16 BE | key slot (WrappedKey.to_bytes())
    segment = AES-256-GCM(DEK, nonce = prefix || counter u32 BE || last flag u8,
                          aad = identity encoding || header hash) -> ciphertext || tag (16)

The header hash covers the immutable header fields (bytes 0..16) but not the key slot: the key
slot is authenticated by the KEK itself (AEAD AAD / KMS encryption context), and leaving it out lets
KEK rotation replace the key slot without re-encrypting a single segment.  Hand-written framing
(no library implements this segment format); the AEAD is cryptography's AESGCM.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, replace

from enclave_common.crypto.errors import KeyFormatError, ObjectFormatError
from enclave_common.crypto.wrapped_key import KeyContext, WrappedKey

OBJECT_MAGIC = b"ENCO"
OBJECT_FORMAT_VERSION = 1
DEFAULT_SEGMENT_SIZE = 1024 * 1024
MAX_SEGMENT_SIZE = 64 * 1024 * 1024
NONCE_PREFIX_BYTES = 7
TAG_BYTES = 16
MAX_SEGMENTS = 2**32
_FIXED = struct.Struct(">4sBBI7sH")
_IMMUTABLE = struct.Struct(">4sBBI7s")
HEADER_FIXED_BYTES = _FIXED.size
"""Bytes before the key slot (19); the hashed immutable part is the first 17."""
_HEADER_HASH_LABEL = b"enclave.object.header.v1\x00"
_IDENTITY_LABEL = b"enclave.object.identity.v1\x00"


@dataclass(frozen=True, slots=True)
class ObjectIdentity:
    """Where an object lives: tenant, study key and object key (opaque ids, never raw UIDs)."""

    tenant: str
    study_key: str
    object_key: str

    def __post_init__(self) -> None:
        for name in ("tenant", "study_key", "object_key"):
            value: str = getattr(self, name)
            if not value or len(value.encode()) > 1024:
                raise ValueError(f"ObjectIdentity.{name} must be 1-1024 UTF-8 bytes")

    def encode(self) -> bytes:
        """Canonical encoding: label, then each field as u16 BE length || UTF-8."""
        parts = [v.encode() for v in (self.tenant, self.study_key, self.object_key)]
        return _IDENTITY_LABEL + b"".join(struct.pack(">H", len(p)) + p for p in parts)

    def key_context(self) -> KeyContext:
        """The context an object's DEK is generated and unwrapped with (a fresh DEK per object, bound
        to its tenant and study)."""
        return study_key_context(self.tenant, self.study_key)


def study_key_context(tenant: str, study_key: str) -> KeyContext:
    """Key context of a study's DEK: ``{"tenant": ..., "study_key": ...}``."""
    return {"tenant": tenant, "study_key": study_key}


@dataclass(frozen=True, slots=True)
class ObjectHeader:
    """Decoded object header."""

    segment_size: int
    nonce_prefix: bytes
    wrapped_key: WrappedKey
    format_version: int = OBJECT_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != OBJECT_FORMAT_VERSION:
            raise ObjectFormatError(
                f"object format version {self.format_version} is not supported; supported: "
                f"{OBJECT_FORMAT_VERSION}"
            )
        if not 1 <= self.segment_size <= MAX_SEGMENT_SIZE:
            raise ObjectFormatError(f"segment size {self.segment_size} is outside 1..{MAX_SEGMENT_SIZE}")
        if len(self.nonce_prefix) != NONCE_PREFIX_BYTES:
            raise ObjectFormatError(f"nonce prefix must be {NONCE_PREFIX_BYTES} bytes")

    def to_bytes(self) -> bytes:
        slot = self.wrapped_key.to_bytes()
        return (
            _FIXED.pack(OBJECT_MAGIC, self.format_version, 0, self.segment_size, self.nonce_prefix, len(slot))
            + slot
        )

    def header_hash(self) -> bytes:
        """SHA-256 over the immutable header fields (everything before the key slot length)."""
        immutable = _IMMUTABLE.pack(
            OBJECT_MAGIC, self.format_version, 0, self.segment_size, self.nonce_prefix
        )
        return hashlib.sha256(_HEADER_HASH_LABEL + immutable).digest()

    def segment_aad(self, identity: ObjectIdentity) -> bytes:
        """Associated data of every segment of this object."""
        return identity.encode() + self.header_hash()

    def with_wrapped_key(self, wrapped_key: WrappedKey) -> ObjectHeader:
        """Same header with another key slot (used by KEK rotation; segments stay valid)."""
        return replace(self, wrapped_key=wrapped_key)

    @staticmethod
    def needed_length(prefix: bytes | memoryview) -> int:
        """Total header length, given at least ``HEADER_FIXED_BYTES`` leading bytes of an object."""
        if len(prefix) < HEADER_FIXED_BYTES:
            raise ObjectFormatError(
                f"encrypted object is {len(prefix)} bytes, shorter than the {HEADER_FIXED_BYTES}-byte header"
            )
        magic, version, _flags, _size, _prefix, slot_len = _FIXED.unpack_from(prefix, 0)
        if magic != OBJECT_MAGIC:
            raise ObjectFormatError("not an Enclave encrypted object (bad magic)")
        if version != OBJECT_FORMAT_VERSION:
            raise ObjectFormatError(
                f"object format version {version} is not supported; supported: {OBJECT_FORMAT_VERSION}"
            )
        return int(HEADER_FIXED_BYTES + slot_len)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> tuple[ObjectHeader, int]:
        """Parse a header from the start of ``data``; returns it and its length in bytes."""
        length = cls.needed_length(data)
        if len(data) < length:
            raise ObjectFormatError("encrypted object ends inside its header key slot")
        _magic, version, flags, segment_size, nonce_prefix, _slot_len = _FIXED.unpack_from(data, 0)
        if flags != 0:
            raise ObjectFormatError(f"header flags {flags:#04x} are not supported; must be 0")
        try:
            wrapped = WrappedKey.from_bytes(memoryview(data)[HEADER_FIXED_BYTES:length])
        except KeyFormatError as exc:
            raise ObjectFormatError(f"header key slot is malformed: {exc}") from exc
        header = cls(
            segment_size=segment_size, nonce_prefix=nonce_prefix, wrapped_key=wrapped, format_version=version
        )
        return header, length


def segment_nonce(nonce_prefix: bytes, index: int, last: bool) -> bytes:
    """12-byte nonce: 7-byte prefix || segment counter u32 BE || last-segment flag."""
    return nonce_prefix + struct.pack(">IB", index, 1 if last else 0)
