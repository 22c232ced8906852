"""How many uploads one gateway process receives at once (``ENCLAVE_GATEWAY_MAX_CONCURRENT_UPLOADS``).

The spool's budgets bound the sealed bytes the uploads keep; each upload in progress also holds what
they do not count: while its body streams, the plaintext chunk being sealed (up to ``CHUNK_BYTES``,
1 MiB) and the parser's and the validator's state, 1.13 MiB in all (measured with tracemalloc, 20
uploads each held in the middle of a large instance), and the server's read buffer (64 KiB);
while it is handed off, the chunk being published, about 2.4 MiB (the sealed chunk read back from the
spool, 1 MiB, and its base64 record, 1.4 MiB, waiting for the Kafka producer, which keeps one batch
per partition: an estimate from the code, not a measurement). Until the eighteenth session nothing
bounded how many uploads ran at once, so nothing bounded that memory. Past the limit an upload is
answered 503 ``too_many_uploads`` with ``Retry-After`` before its body is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from enclave_common.errors import TransientError

#: 128 uploads at about 2.4 MiB each (the hand-off's cost, the larger) hold about 310 MiB: with the
#: spool's memory cap (256 MiB) and the process itself (about 120 MiB), some 690 MiB of the gateway's
#: 1 Gi pod limit in deploy/k8s, the rest left to the Kafka client's buffers and Python's allocator.
DEFAULT_MAX_CONCURRENT_UPLOADS = 128


class TooManyUploads(TransientError):
    """Every upload slot of this process is held: the upload is refused before its body is read
    (nothing of it kept or handed off); another replica, or this one a moment later, can take it."""

    code = "too_many_uploads"


class UploadSlots:
    """The uploads this process is receiving, at most ``limit`` at once. Single event loop: taking a
    slot is a check and an increment with no await between them, so no lock is needed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        """One slot for the upload under way, given back however it ends (answered, refused, failed,
        abandoned by its client, cancelled); :class:`TooManyUploads` when every slot is held."""
        if self.in_use >= self.limit:
            raise TooManyUploads(
                f"This gateway is receiving {self.in_use} uploads, the most it takes at once "
                f"(ENCLAVE_GATEWAY_MAX_CONCURRENT_UPLOADS={self.limit}); nothing of this upload was read "
                "or kept, send it again after Retry-After seconds"
            )
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
