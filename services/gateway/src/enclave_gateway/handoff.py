"""The sealed hand-off: each accepted instance is sealed to the ingest public key while it streams,
spooled as ciphertext, and published as chunks of at most 1 MiB only when the whole request is valid.

The gateway holds no key that can open what it sealed. The request is answered only after Kafka
acknowledged every chunk and event (acks=all, idempotent producer); any failure is reported as
``KafkaUnavailable`` so the request answers 503 and acknowledges nothing. A spool the gateway cannot
write (its disk is full) is ``SpoolUnavailable``, answered the same way.
"""

from __future__ import annotations

import asyncio
import struct
import tempfile
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from enclave_common import topics
from enclave_common.crypto import InstanceSealer, SealContext
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.errors import TransientError, exhausted_resource
from enclave_common.events import UploadChunk, UploadReceived
from enclave_common.kafka import DirectPublisher
from enclave_common.pseudonyms import InstanceKeys

_LEN = struct.Struct(">I")
#: Chunks published concurrently per instance (bounded memory: ~window x 1.4 MiB of envelopes).
PUBLISH_WINDOW = 8


class KafkaUnavailable(TransientError):
    code = "kafka_unavailable"


class SpoolUnavailable(TransientError):
    """The gateway could not write or read its spool (its disk is full, a file could not be
    created): the request answers 503 and acknowledges nothing. Another replica, or this one once
    space is freed, can take it again."""

    code = "spool_unavailable"


@contextmanager
def _spool_io() -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        resource = exhausted_resource(exc)
        what = f"ran out of {resource}" if resource else "could not be used"
        raise SpoolUnavailable(
            f"The gateway's spool {what}, so the upload could not be held; nothing was accepted, retry later"
        ) from exc


#: Sealed bytes all the requests of a process may keep in memory together: a quarter of the gateway's
#: 1 Gi pod memory limit in deploy/k8s (``ENCLAVE_GATEWAY_SPOOL_MEMORY_TOTAL_BYTES``).
DEFAULT_SPOOL_MEMORY_TOTAL_BYTES = 256 * 1024 * 1024


class SpoolMemoryBudget:
    """Bytes of sealed data all the requests of this process may keep in memory at once
    (``ENCLAVE_GATEWAY_SPOOL_MEMORY_TOTAL_BYTES``). Each request's :class:`SpoolBudget` draws on it:
    past it, instances spill to the spool directory as past the request's own budget, so many slow
    requests in flight cannot hold ``SPOOL_MEMORY_BYTES`` each in memory without bound. A sealed
    instance gives its bytes back when it rolls over to disk or is discarded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size


class SpoolBudget:
    """Bytes of sealed data one request may keep in memory; past it, its instances spill to files in
    the spool directory. Memory per request stays bounded whatever its size, and the common small
    upload costs no file at all. With ``shared``, the process-wide :class:`SpoolMemoryBudget` must
    also have room."""

    def __init__(self, memory_bytes: int, shared: SpoolMemoryBudget | None = None) -> None:
        self.remaining = memory_bytes
        self.shared = shared

    def take(self, size: int) -> bool:
        if size > self.remaining:
            return False
        if self.shared is not None and not self.shared.take(size):
            return False
        self.remaining -= size
        return True

    def release(self, size: int) -> None:
        """Memory an instance no longer holds (rolled over to disk, or discarded): back to the
        process. The request's own budget is not refilled: it bounds what the request ever kept."""
        if self.shared is not None:
            self.shared.release(size)


class SpoolDiskBudget:
    """Bytes of sealed data all the requests of this process may keep in the spool directory at once
    (``ENCLAVE_GATEWAY_SPOOL_DISK_BYTES``; None: no limit but the disk's). In Kubernetes the spool is
    an emptyDir whose ``sizeLimit`` the kubelet enforces by evicting the pod, with every upload in
    flight on it, and the free space the service sees is the node's, not that limit's: past this
    budget an upload is refused with 503 ``spool_unavailable`` (retry later) instead."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, size: int) -> None:
        if self.limit is not None and self.used + size > self.limit:
            raise SpoolUnavailable(
                f"The gateway's spool is holding {self.used} bytes of other uploads, and this one would "
                f"pass its limit of {self.limit} bytes; nothing was accepted, retry later"
            )
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size


class SealedInstance:
    """One part being sealed as it streams; plaintext is buffered at most one chunk at a time.

    The ciphertext is kept in a :class:`tempfile.SpooledTemporaryFile`: in memory while the request's
    :class:`SpoolBudget` (and the process-wide :class:`SpoolMemoryBudget`) allow, otherwise an unnamed
    file in ``spool_dir`` (gone when closed, or with the process)."""

    def __init__(
        self,
        recipient: X25519PublicKey,
        tenant: str,
        spool_dir: Path,
        chunk_bytes: int,
        budget: SpoolBudget,
        disk: SpoolDiskBudget | None = None,
    ) -> None:
        self.tenant = tenant
        self.instance_upload_id = new_event_id()
        self._sealer = InstanceSealer(
            recipient, SealContext(tenant, self.instance_upload_id), max_chunk_bytes=chunk_bytes
        )
        self._chunk_bytes = chunk_bytes
        self._buffer = bytearray()
        self._budget = budget
        self._disk = disk or SpoolDiskBudget(None)
        self._on_disk = 0
        self._in_memory_bytes = 0  # taken from the budget, given back at the rollover or discard
        # max_size=0: never rolls over by itself; _write decides against the request's budget.
        self._file = tempfile.SpooledTemporaryFile(  # noqa: SIM115 - closed by discard()
            max_size=0, mode="w+b", prefix="sealed-", dir=str(spool_dir)
        )
        self._in_memory = True
        self.count = 0
        self.size = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        while len(self._buffer) > self._chunk_bytes:
            self._write(self._sealer.seal_chunk(memoryview(self._buffer)[: self._chunk_bytes], final=False))
            del self._buffer[: self._chunk_bytes]

    def finish(self) -> None:
        self._write(self._sealer.seal_chunk(bytes(self._buffer), final=True))
        self._buffer.clear()
        with _spool_io():
            self._file.flush()

    def _write(self, sealed: bytes | bytearray) -> None:
        size = _LEN.size + len(sealed)
        with _spool_io():
            if self._in_memory and self._budget.take(size):
                self._in_memory_bytes += size
            elif self._in_memory:
                self._disk.reserve(self._file.tell() + size)  # what the rollover moves to disk, and this
                self._on_disk = self._file.tell() + size
                self._file.rollover()
                self._in_memory = False
                self._give_back_memory()
            else:
                self._disk.reserve(size)
                self._on_disk += size
            self._file.write(_LEN.pack(len(sealed)))
            self._file.write(sealed)
        self.count += 1

    @property
    def in_memory(self) -> bool:
        return self._in_memory

    def chunks(self) -> Iterator[bytes]:
        with _spool_io():  # only the reads raise here: nothing is thrown into a generator at its yield
            self._file.seek(0)
            while header := self._file.read(_LEN.size):
                yield self._file.read(_LEN.unpack(header)[0])

    def _give_back_memory(self) -> None:
        self._budget.release(self._in_memory_bytes)
        self._in_memory_bytes = 0

    def discard(self) -> None:
        self._file.close()
        self._disk.release(self._on_disk)
        self._on_disk = 0
        self._give_back_memory()


class Handoff:
    """Publishes sealed instances and the upload events.

    Events are queued without waiting (``DirectPublisher.send``) and their acknowledgements awaited
    together (:meth:`Acknowledgements.settle`): the producer batches what is queued at the same time
    into one produce request, so a one-instance upload pays one round trip for its chunk and its
    ``upload.received`` instead of one each. At most ``PUBLISH_WINDOW`` chunks wait unacknowledged,
    so a large instance still streams from the spool with bounded memory.
    """

    def __init__(self, publisher: DirectPublisher, timeout_s: float) -> None:
        self._publisher = publisher
        self._timeout = timeout_s

    def acknowledgements(self) -> Acknowledgements:
        return Acknowledgements(self._publisher, self._timeout)

    async def publish_instance(
        self,
        acks: Acknowledgements,
        sealed: SealedInstance,
        *,
        upload_id: str,
        actor: str,
        sha256: str,
        keys: InstanceKeys,
        sop_class_uid: str,
        transfer_syntax_uid: str,
    ) -> None:
        """Queue every chunk, then ``upload.received``; ``acks`` holds their acknowledgements."""
        for index, piece in enumerate(sealed.chunks()):
            chunk = Envelope.for_topic(
                topics.UPLOAD_CHUNK,
                UploadChunk(
                    upload_id=upload_id,
                    instance_upload_id=sealed.instance_upload_id,
                    index=index,
                    count=sealed.count,
                    sealed=piece,
                    total_size=sealed.size,
                    sha256=sha256,
                ),
                source="gateway",
                tenant=sealed.tenant,
                actor=actor,
                correlation_id=upload_id,
            )
            await acks.send(topics.UPLOAD_CHUNK, chunk, sealed.instance_upload_id, windowed=True)
        received = Envelope.for_topic(
            topics.UPLOAD_RECEIVED,
            UploadReceived(
                upload_id=upload_id,
                instance_upload_id=sealed.instance_upload_id,
                patient_key=keys.patient_key,
                study_key=keys.study_key,
                series_key=keys.series_key,
                instance_key=keys.instance_key,
                sop_class_uid=sop_class_uid,
                transfer_syntax_uid=transfer_syntax_uid,
                size=sealed.size,
                sha256=sha256,
                chunk_count=sealed.count,
            ),
            source="gateway",
            tenant=sealed.tenant,
            actor=actor,
            correlation_id=upload_id,
        )
        await acks.send(topics.UPLOAD_RECEIVED, received, sealed.instance_upload_id)

    async def publish_event(self, topic: str, envelope: Envelope, key: str) -> None:
        acks = self.acknowledgements()
        await acks.send(topic, envelope, key)
        await acks.settle()


class Acknowledgements:
    """The acknowledgements of events queued for one request; :meth:`settle` waits for all of them.

    Any failure (Kafka down, a timeout, a refused record) becomes ``KafkaUnavailable``, so the request
    answers 503 and acknowledges nothing.
    """

    def __init__(self, publisher: DirectPublisher, timeout_s: float) -> None:
        self._publisher = publisher
        self._timeout = timeout_s
        self._window: deque[asyncio.Future[Any]] = deque()
        self._rest: list[asyncio.Future[Any]] = []

    async def send(self, topic: str, envelope: Envelope, key: str, *, windowed: bool = False) -> None:
        """Queue one event; with ``windowed``, first wait while ``PUBLISH_WINDOW`` such events are
        unacknowledged (chunks: bounded memory however large the instance)."""
        with _kafka_failures():
            if windowed:
                while len(self._window) >= PUBLISH_WINDOW:
                    async with asyncio.timeout(self._timeout):
                        await self._window.popleft()
            # Not wrapped in wait_for (a task per event): the producer bounds its own waits for
            # metadata and buffer space by its request timeout.
            ack = await self._publisher.send(topic, envelope, key=key)
        ack.add_done_callback(_retrieve)
        (self._window if windowed else self._rest).append(ack)

    async def settle(self) -> None:
        """Wait until every queued event is acknowledged."""
        pending = [*self._window, *self._rest]
        self._window.clear()
        self._rest.clear()
        if pending:
            with _kafka_failures():
                async with asyncio.timeout(self._timeout):  # no task per wait, unlike wait_for
                    await asyncio.gather(*pending)


def _retrieve(ack: asyncio.Future[Any]) -> None:
    """Mark an acknowledgement's failure as seen: after the first failure the request answers 503 and
    the others are not awaited, which asyncio would otherwise report as never retrieved."""
    if not ack.cancelled():
        ack.exception()


@contextmanager
def _kafka_failures() -> Iterator[None]:
    try:
        yield
    except (TimeoutError, ConnectionError, OSError) as exc:
        raise KafkaUnavailable(
            "Kafka did not acknowledge the upload; nothing was accepted, retry later"
        ) from exc
    except Exception as exc:
        if type(exc).__module__.startswith(("aiokafka", "kafka", "faststream")):
            raise KafkaUnavailable(
                "Kafka did not acknowledge the upload; nothing was accepted, retry later"
            ) from exc
        raise
