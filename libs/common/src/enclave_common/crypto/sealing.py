"""Sealing instance bytes from the gateway to the ingest service (HPKE, RFC 9180).

The suite is DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM from
``cryptography.hazmat.primitives.hpke``.  That API is single-shot (no HPKE context with sequence
numbers or exporter), so a *streamed* seal is built as a KEM/DEM on top of it, by hand:

* once per instance, HPKE seals a fresh random 32-byte *stream key* to the ingest public key with
  ``info`` = label || tenant || instance upload id (the "key block", 80 bytes);
* every chunk is AES-256-GCM under the stream key, nonce = 7 zero bytes || chunk index (u32 BE)
  || final flag, AAD = the chunk header (which holds the key block, index and flag) || context.

The key block travels with *every* chunk (80 bytes per MiB) so each Kafka message is
self-describing: a consumer restarted mid-instance, or a redelivered message, can be verified on its
own, and a chunk from another instance is rejected without state.  The unsealer decapsulates once
and then only compares key blocks.  Truncation, reordering and duplication are caught by the index
and final flag in the nonce plus the unsealer's sequence check.  HPKE base mode does not
authenticate the sender; the gateway's identity is established by Kafka ACLs on ``upload.chunk``.
"""

from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from enclave_common.crypto.errors import KeyFormatError, SealedChunkSequenceError, SealError

_SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_256_GCM)
_ONESHOT_INFO_LABEL = b"enclave.seal.oneshot.v1\x00"
_STREAM_INFO_LABEL = b"enclave.seal.stream.v1\x00"
_CHUNK_AAD_LABEL = b"enclave.seal.chunk.v1\x00"

CHUNK_MAGIC = b"ENCS"
CHUNK_FORMAT_VERSION = 1
_FLAG_FINAL = 0x01
_CHUNK_FIXED = struct.Struct(">4sBBIH")  # magic, version, flags, chunk index, key block length
KEY_BLOCK_BYTES = KEM.X25519.enc_length() + 32 + 16
"""HPKE enc (32) || sealed stream key (32) || tag (16)."""
SEALED_CHUNK_OVERHEAD = _CHUNK_FIXED.size + KEY_BLOCK_BYTES + 16
DEFAULT_MAX_CHUNK_BYTES = 1024 * 1024
_MAX_CHUNK_INDEX = 0xFFFFFFFF
_TAG_BYTES = 16


@dataclass(frozen=True, slots=True)
class SealContext:
    """What a sealed payload is bound to: the tenant and the instance upload id (opaque, no PHI)."""

    tenant: str
    instance_upload_id: str

    def __post_init__(self) -> None:
        for name in ("tenant", "instance_upload_id"):
            value: str = getattr(self, name)
            if not value or len(value.encode()) > 1024:
                raise ValueError(f"SealContext.{name} must be 1-1024 UTF-8 bytes")

    def encode(self) -> bytes:
        """Canonical length-prefixed encoding used in HPKE info and chunk AAD."""
        parts = [v.encode() for v in (self.tenant, self.instance_upload_id)]
        return b"".join(struct.pack(">H", len(p)) + p for p in parts)


# ---- keys ------------------------------------------------------------------------------------


def generate_ingest_keypair() -> X25519PrivateKey:
    """A new X25519 private key for the ingest service (its public key goes to the gateway)."""
    return X25519PrivateKey.generate()


def private_key_to_pem(key: X25519PrivateKey, password: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted with ``password`` when given (best available scheme)."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def public_key_to_pem(key: X25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM, the form distributed to the gateway."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_to_raw(key: X25519PublicKey) -> bytes:
    """The 32 raw public key bytes (RFC 7748)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private_key(
    source: bytes | str | os.PathLike[str], password: bytes | None = None
) -> X25519PrivateKey:
    """Load the ingest private key from PEM/DER bytes, 32 raw bytes, or a file path (str/Path)."""
    data = Path(source).read_bytes() if isinstance(source, str | os.PathLike) else source
    if len(data) == 32 and not data.startswith(b"-----"):
        return X25519PrivateKey.from_private_bytes(data)
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_private_key(data, password=password)
        else:
            key = serialization.load_der_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise KeyFormatError(
            "ingest private key must be PKCS#8 PEM/DER (optionally password-protected) or 32 raw bytes"
        ) from exc
    if not isinstance(key, X25519PrivateKey):
        raise KeyFormatError(f"ingest private key is {type(key).__name__}; only X25519 is accepted")
    return key


def load_public_key(source: bytes | str | os.PathLike[str]) -> X25519PublicKey:
    """Load the ingest public key from SubjectPublicKeyInfo PEM/DER, 32 raw bytes, or a file path."""
    data = Path(source).read_bytes() if isinstance(source, str | os.PathLike) else source
    if len(data) == 32 and not data.startswith(b"-----"):
        return X25519PublicKey.from_public_bytes(data)
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFormatError(
            "ingest public key must be SubjectPublicKeyInfo PEM/DER or 32 raw bytes"
        ) from exc
    if not isinstance(key, X25519PublicKey):
        raise KeyFormatError(f"ingest public key is {type(key).__name__}; only X25519 is accepted")
    return key


# ---- one-shot ---------------------------------------------------------------------------------


def seal(payload: bytes, recipient: X25519PublicKey, context: SealContext) -> bytes:
    """HPKE single-shot seal of a small payload: enc (32) || ciphertext || tag (16)."""
    return _SUITE.encrypt(payload, recipient, info=_ONESHOT_INFO_LABEL + context.encode())


def unseal(sealed: bytes, private_key: X25519PrivateKey, context: SealContext) -> bytes:
    """Open ``seal`` output; raises SealError when the key, context or bytes do not match."""
    try:
        return _SUITE.decrypt(sealed, private_key, info=_ONESHOT_INFO_LABEL + context.encode())
    except (InvalidTag, ValueError) as exc:
        raise SealError(
            "sealed payload did not open: wrong recipient key, wrong context, or tampered"
        ) from exc


# ---- streamed ---------------------------------------------------------------------------------


def _chunk_nonce(index: int, final: bool) -> bytes:
    return b"\x00" * 7 + struct.pack(">IB", index, 1 if final else 0)


@dataclass(frozen=True, slots=True)
class OpenedChunk:
    """One unsealed chunk: its index, whether it was flagged final, and its plaintext."""

    index: int
    final: bool
    plaintext: bytes


class InstanceSealer:
    """Gateway side: seals one instance as a sequence of chunks (index 0, 1, ...; last one final)."""

    def __init__(
        self,
        recipient: X25519PublicKey,
        context: SealContext,
        *,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    ) -> None:
        stream_key = secrets.token_bytes(32)
        self._aead = AESGCM(stream_key)
        self._key_block = _SUITE.encrypt(stream_key, recipient, info=_STREAM_INFO_LABEL + context.encode())
        self._context_bytes = context.encode()
        self._max_chunk_bytes = max_chunk_bytes
        self._next_index = 0
        self._finished = False

    @property
    def next_index(self) -> int:
        """Index the next ``seal_chunk`` call will use."""
        return self._next_index

    def seal_chunk(self, data: bytes | memoryview, *, final: bool) -> bytearray:
        """Seal the next chunk; pass ``final=True`` on the last one (an empty final chunk is fine).

        Returns a new buffer (header and ciphertext written in place, no extra copy of the payload).
        """
        if self._finished:
            raise SealError("instance stream already sealed its final chunk")
        if len(data) > self._max_chunk_bytes:
            raise SealError(f"chunk of {len(data)} bytes exceeds the limit of {self._max_chunk_bytes} bytes")
        index = self._next_index
        if index > _MAX_CHUNK_INDEX:
            raise SealError("instance stream exceeded 2**32 chunks")
        header = (
            _CHUNK_FIXED.pack(
                CHUNK_MAGIC, CHUNK_FORMAT_VERSION, _FLAG_FINAL if final else 0, index, len(self._key_block)
            )
            + self._key_block
        )
        sealed = bytearray(len(header) + len(data) + _TAG_BYTES)
        sealed[: len(header)] = header
        self._aead.encrypt_into(
            _chunk_nonce(index, final),
            data,
            _CHUNK_AAD_LABEL + header + self._context_bytes,
            memoryview(sealed)[len(header) :],
        )
        self._next_index += 1
        self._finished = final
        return sealed


def seal_instance_chunks(
    data: bytes | memoryview,
    recipient: X25519PublicKey,
    context: SealContext,
    *,
    chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> list[bytearray]:
    """Convenience for tests and small payloads: split ``data`` and seal every chunk."""
    sealer = InstanceSealer(recipient, context, max_chunk_bytes=chunk_bytes)
    view = memoryview(data)
    offsets = list(range(0, len(view), chunk_bytes)) or [0]
    return [sealer.seal_chunk(view[o : o + chunk_bytes], final=o == offsets[-1]) for o in offsets]


class InstanceUnsealer:
    """Ingest side: opens one instance's chunks one at a time, in order, with O(chunk) memory.

    ``unseal_chunk`` enforces index order (0, 1, ...), rejects anything after the final chunk, and
    ``finish`` raises if the final chunk never came.  Sequence problems raise
    ``SealedChunkSequenceError`` (with ``expected``/``received``) so the caller can drop an exact
    redelivery; authentication failures raise ``SealError``.
    """

    def __init__(self, private_key: X25519PrivateKey, context: SealContext) -> None:
        self._private_key = private_key
        self._context_bytes = context.encode()
        self._key_block: bytes | None = None
        self._aead: AESGCM | None = None
        self._next_index = 0
        self._finished = False

    @property
    def finished(self) -> bool:
        """True once the final chunk was opened."""
        return self._finished

    @property
    def next_index(self) -> int:
        """Index of the chunk the unsealer accepts next."""
        return self._next_index

    def open_chunk(self, sealed: bytes | memoryview) -> OpenedChunk:
        """Authenticate and decrypt one chunk without checking its position in the sequence."""
        view = memoryview(sealed)
        if len(view) < SEALED_CHUNK_OVERHEAD:
            raise SealError(
                f"sealed chunk of {len(view)} bytes is shorter than the {SEALED_CHUNK_OVERHEAD}-byte minimum"
            )
        magic, version, flags, index, key_block_len = _CHUNK_FIXED.unpack_from(view, 0)
        if magic != CHUNK_MAGIC or version != CHUNK_FORMAT_VERSION:
            raise SealError(f"not a sealed chunk of format version {CHUNK_FORMAT_VERSION}")
        if flags & ~_FLAG_FINAL or key_block_len != KEY_BLOCK_BYTES:
            raise SealError("sealed chunk header has unknown flags or a wrong key block length")
        header_end = _CHUNK_FIXED.size + key_block_len
        key_block = bytes(view[_CHUNK_FIXED.size : header_end])
        aead = self._stream_aead(key_block)
        final = bool(flags & _FLAG_FINAL)
        try:
            plaintext = aead.decrypt(
                _chunk_nonce(index, final),
                view[header_end:],
                _CHUNK_AAD_LABEL + bytes(view[:header_end]) + self._context_bytes,
            )
        except InvalidTag as exc:
            raise SealError(
                f"sealed chunk {index} failed authentication (tampered or wrong instance)"
            ) from exc
        return OpenedChunk(index=index, final=final, plaintext=plaintext)

    def unseal_chunk(self, sealed: bytes | memoryview) -> bytes:
        """Open the next chunk in sequence and return its plaintext."""
        opened = self.open_chunk(sealed)
        if self._finished:
            raise SealedChunkSequenceError(
                f"chunk {opened.index} arrived after the final chunk", expected=None, received=opened.index
            )
        if opened.index != self._next_index:
            raise SealedChunkSequenceError(
                f"chunk {opened.index} arrived where chunk {self._next_index} was expected",
                expected=self._next_index,
                received=opened.index,
            )
        self._next_index += 1
        self._finished = opened.final
        return opened.plaintext

    def finish(self) -> None:
        """Raise unless the final chunk was opened (detects a truncated instance)."""
        if not self._finished:
            raise SealedChunkSequenceError(
                f"instance stream ended after {self._next_index} chunks without a final chunk",
                expected=self._next_index,
                received=None,
            )

    def _stream_aead(self, key_block: bytes) -> AESGCM:
        if self._aead is not None:
            if key_block != self._key_block:
                raise SealError("sealed chunk belongs to another instance stream (key block differs)")
            return self._aead
        try:
            stream_key = _SUITE.decrypt(
                key_block, self._private_key, info=_STREAM_INFO_LABEL + self._context_bytes
            )
        except (InvalidTag, ValueError) as exc:
            raise SealError(
                "sealed chunk key block did not open: wrong ingest key, wrong context, or tampered"
            ) from exc
        self._key_block = key_block
        self._aead = AESGCM(stream_key)
        return self._aead
