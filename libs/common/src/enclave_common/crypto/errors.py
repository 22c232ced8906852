"""Errors raised by the crypto package.

Every error here is *permanent* for the message that caused it (retrying the same bytes gives the
same answer), so the service wiring can send the input to its DLQ. Messages name segment/chunk
indexes, key ids and versions, never key material, plaintext or PHI.
"""

from __future__ import annotations


class CryptoError(Exception):
    """Base class of every error raised by ``enclave_common.crypto``."""


class KeyFormatError(CryptoError):
    """A key, keyring file or wrapped key could not be parsed or has the wrong size."""


class KeyNotFoundError(CryptoError):
    """A wrapped key names a KEK (id or version) this provider does not hold."""


class KeyRetiredError(KeyNotFoundError):
    """A wrapped key names a KEK version that was retired: its DEKs are crypto-shredded."""


class KeyUnwrapError(CryptoError):
    """A wrapped key failed authentication: wrong KEK, wrong context, or tampered ciphertext."""


class SealError(CryptoError):
    """A sealed payload or sealed chunk is malformed, tampered, or out of sequence."""


class SealedChunkSequenceError(SealError):
    """A sealed chunk arrived out of order, twice, after the final chunk, or the final chunk is missing.

    ``expected`` is the next chunk index the unsealer accepts (``None`` once the stream ended);
    ``received`` is the chunk index that arrived (``None`` when the stream was closed without a
    final chunk).  Ingest uses these to tell a harmless redelivery from an attack.
    """

    def __init__(self, message: str, *, expected: int | None, received: int | None) -> None:
        super().__init__(message)
        self.expected = expected
        self.received = received


class ObjectFormatError(CryptoError):
    """An encrypted object's header is malformed or of an unsupported format version."""


class SegmentError(CryptoError):
    """A segment of an encrypted object failed verification.

    ``segment_index`` is the 0-based index of the failing segment; ``problem`` is a short,
    stable machine-readable reason (``"authentication"``, ``"truncated"``, ``"trailing-data"``,
    ``"short-segment"``).
    """

    def __init__(self, message: str, *, segment_index: int, problem: str) -> None:
        super().__init__(message)
        self.segment_index = segment_index
        self.problem = problem


class ObjectTruncatedError(SegmentError):
    """The object ends without a segment flagged as last: segments were cut off the end."""
