"""The sealed hand-off: each accepted instance is sealed to the ingest public key while it streams,
spooled as ciphertext, and published as chunks of at most 1 MiB only when the whole request is valid.

The gateway holds no key that can open what it sealed. The request is answered only after Kafka
acknowledged every chunk and event (acks=all, idempotent producer); any failure is reported as
``KafkaUnavailable`` so the request answers 503 and acknowledges nothing. A spool the gateway cannot
write (its disk is full) is ``SpoolUnavailable``, answered the same way.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

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
    """One request's spool: the bytes of sealed data it may keep in memory, and the file its
    instances spill to past them. Memory per request stays bounded whatever its size, and the common
    small upload costs no file at all. With ``shared``, the process-wide :class:`SpoolMemoryBudget`
    must also have room. Every instance sealed under this budget spills to the same
    :class:`SpoolFile`, so the request holds one file descriptor however many parts it has."""

    def __init__(self, memory_bytes: int, shared: SpoolMemoryBudget | None = None) -> None:
        self.remaining = memory_bytes
        self.shared = shared
        self._file: SpoolFile | None = None

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

    def spool_file(self, spool_dir: Path, disk: SpoolDiskBudget | None) -> SpoolFile:
        """The request's spool file in ``spool_dir``, drawing on ``disk`` (None: no limit but the
        disk's); its instances must all name the same directory and disk budget."""
        if self._file is None:
            self._file = SpoolFile(spool_dir, disk or SpoolDiskBudget(None))
        elif self._file.directory != spool_dir or (disk is not None and disk is not self._file.disk):
            raise ValueError(
                "The instances of one request spill to one spool file: they must name the same spool "
                "directory and disk budget"
            )
        return self._file


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


class SpoolExtent:
    """Where one spilled instance's sealed chunks lie in its request's :class:`SpoolFile`: from
    ``start`` to ``end``, each chunk behind its 4-byte length."""

    __slots__ = ("end", "live", "start")

    def __init__(self, start: int) -> None:
        self.start = start
        self.end = start
        self.live = True


class SpoolFile:
    """The one unnamed file in the spool directory that all the spilled instances of a request
    share, each at its own :class:`SpoolExtent`, read back by offset at the hand-off.

    Until the nineteenth session each spilled instance kept a file of its own open until the hand-off,
    so a request of 10,000 parts (``MAX_PARTS``) could hold 10,000 descriptors, and the uploads in
    flight together could exhaust the process's, failing every other request and the Kafka and
    database sockets with them. Now a request holds at most one, opened at its first spill.

    A request's instances are sealed one after another (multipart parts are sequential), so only the
    last extent started grows, at the end of the file. An extent given back at the end of the file
    (an instance refused half-way) is cut off at once: the file is truncated and its bytes given back
    to the :class:`SpoolDiskBudget`; one given back before the end keeps its bytes until the extents
    after it go too. When the last live extent goes, the file is closed, its descriptor and all its
    bytes given back. The file has no name (``O_TMPFILE``, or unlinked at once), so it vanishes when
    closed or when the process dies. Writes and reads are positional (``pwrite``/``pread``): no
    buffer, no shared file position, and a full disk fails the write that hits it.
    """

    def __init__(self, directory: Path, disk: SpoolDiskBudget) -> None:
        self.directory = directory
        self.disk = disk
        self._file: BinaryIO | None = None
        self._extents: list[SpoolExtent] = []  # live ones, and dead ones before a live one, in file order
        self._end = 0  # bytes written
        self._reserved = 0  # bytes taken from the disk budget: at least what the file holds

    def start(self) -> SpoolExtent:
        """A new extent at the end of the file (opened now if the request had none open)."""
        if self._file is None:
            with _spool_io():
                self._file = tempfile.TemporaryFile(  # noqa: SIM115 - closed by release()
                    mode="w+b", buffering=0, prefix="sealed-", dir=str(self.directory)
                )
        extent = SpoolExtent(self._end)
        self._extents.append(extent)
        return extent

    def append(self, extent: SpoolExtent, records: Sequence[bytes | bytearray]) -> None:
        """Write ``records`` (sealed chunks) at the end of ``extent``, the last one started; their
        bytes are reserved in the disk budget first, so a refusal writes nothing."""
        if self._file is None or not self._extents or self._extents[-1] is not extent or not extent.live:
            raise RuntimeError(
                "Only the instance a request spilled last may append to its spool file; a request's "
                "instances are sealed one after another"
            )
        size = sum(_LEN.size + len(record) for record in records)
        self.disk.reserve(size)
        self._reserved += size
        fd = self._file.fileno()
        with _spool_io():
            for record in records:
                _write_at(fd, _LEN.pack(len(record)), self._end)
                _write_at(fd, record, self._end + _LEN.size)
                self._end += _LEN.size + len(record)
                extent.end = self._end

    def read(self, extent: SpoolExtent) -> Iterator[bytes]:
        """The sealed chunks of ``extent``, in order, read one at a time."""
        at = extent.start
        while at < extent.end:
            if self._file is None or not extent.live:  # checked at every chunk: the file may close between
                raise RuntimeError("The instance's spooled chunks were discarded; they cannot be read")
            fd = self._file.fileno()
            with _spool_io():  # only the reads raise here: nothing is thrown into a generator at its yield
                (size,) = _LEN.unpack(_read_at(fd, _LEN.size, at))
                record = _read_at(fd, size, at + _LEN.size)
            at += _LEN.size + size
            yield record

    def release(self, extent: SpoolExtent) -> None:
        """Give ``extent`` back: what lies at the end of the file is cut off, and the file is closed
        with the last live extent. Never raises (it runs when a request ends, however it ends)."""
        if not extent.live:
            return
        extent.live = False
        while self._extents and not self._extents[-1].live:
            self._extents.pop()
        end = self._extents[-1].end if self._extents else 0
        if self._file is None or not self._extents:
            self._close()
        elif end < self._reserved:
            try:
                os.ftruncate(self._file.fileno(), end)
            except OSError:
                return  # the bytes stay reserved until the file is closed
            self.disk.release(self._reserved - end)
            self._reserved = self._end = end

    def _close(self) -> None:
        if self._file is not None:
            with suppress(OSError):
                self._file.close()
            self._file = None
        self.disk.release(self._reserved)
        self._reserved = self._end = 0


def _write_at(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _read_at(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise OSError(errno.EIO, "the spool file ends before the chunk written there")
        data += more
    return data


class SealedInstance:
    """One part being sealed as it streams; plaintext is buffered at most one chunk at a time.

    The sealed chunks are kept in memory while the request's :class:`SpoolBudget` (and the
    process-wide :class:`SpoolMemoryBudget`) allow; past them, they and every later chunk of the
    instance go to its own extent of the request's :class:`SpoolFile`, an unnamed file in
    ``spool_dir`` (gone when closed, or with the process)."""

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
        self._spool_dir = spool_dir
        self._disk = disk
        self._in_memory: list[bytes] = []  # sealed chunks, while the budget allows
        self._in_memory_bytes = 0  # taken from the budget, given back at the rollover or discard
        self._spool: SpoolFile | None = None
        self._extent: SpoolExtent | None = None  # where the chunks are once the instance spilled
        self._discarded = False
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

    def _write(self, sealed: bytearray) -> None:
        size = _LEN.size + len(sealed)
        if self._extent is None and self._budget.take(size):
            self._in_memory.append(bytes(sealed))
            self._in_memory_bytes += size
        elif self._extent is None:  # the rollover: what the instance kept in memory goes first
            self._spool = self._budget.spool_file(self._spool_dir, self._disk)
            self._extent = self._spool.start()
            self._spool.append(self._extent, [*self._in_memory, sealed])
            self._in_memory.clear()
            self._give_back_memory()
        else:
            assert self._spool is not None
            self._spool.append(self._extent, [sealed])
        self.count += 1

    @property
    def in_memory(self) -> bool:
        return self._extent is None

    @property
    def discarded(self) -> bool:
        """Whether :meth:`discard` gave back what the instance held (its chunks are gone)."""
        return self._discarded

    def chunks(self) -> Iterator[bytes]:
        if self._discarded:
            raise RuntimeError("The instance's sealed chunks were discarded; they cannot be read")
        if self._extent is None:
            return iter(list(self._in_memory))
        assert self._spool is not None
        return self._spool.read(self._extent)

    def _give_back_memory(self) -> None:
        self._budget.release(self._in_memory_bytes)
        self._in_memory_bytes = 0

    def discard(self) -> None:
        """Give back what the instance holds (memory, its extent of the spool file); idempotent."""
        if self._spool is not None and self._extent is not None:
            self._spool.release(self._extent)
        self._in_memory.clear()
        self._give_back_memory()
        self._discarded = True


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
