"""Reassembly of sealed chunks with bounded memory, and the offsets that are safe to commit.

Chunks of one instance share a Kafka key, so they arrive in order on one partition, interleaved with
other instances'. Each chunk is written to a spool file as it arrives (still sealed: no plaintext
rests on disk). An instance is complete when chunks 0..count-1 are all spooled; redelivered or
duplicate chunks overwrite the same file. The committed offset of a partition never passes the
first chunk of an instance that is not yet stored, so a restart mid-instance redelivers all of it.

An instance whose upload broke off (the gateway was killed, or Kafka failed, after some of its chunks
were appended; the client got no acknowledgement and sends it again under a new id) can never
complete. It would hold its partition's committed offset back for good: the group's lag would grow
with every later upload, and every restart would read everything after it again. It is *abandoned*
once its partition holds a record appended ``abandon_after_ms`` after its newest chunk (by the
records' Kafka timestamps, not the consumer's clock): the gateway appends all chunks of an instance
within one request, so any chunk still to come would have been appended before that record, and
would have been read already. A consumer that is only behind, or was stopped for hours, never
abandons an instance that can still complete.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from enclave_common.errors import PermanentError

_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_")


@dataclass
class PendingInstance:
    instance_upload_id: str
    count: int
    partition: tuple[str, int]
    first_offset: int
    received: set[int] = field(default_factory=set)
    last_event_id: str = ""
    #: Kafka timestamp (ms) of the newest chunk received.
    last_timestamp_ms: int = 0

    @property
    def complete(self) -> bool:
        return len(self.received) == self.count


class ChunkSpool:
    """Sealed chunks on local disk, one folder per instance upload id. It has no budget of its own:
    the chunks it holds are what unfinished instances need to complete (they arrive interleaved on
    one partition), so refusing them would stall the partition for good. What it holds is counted
    instead (``held_bytes``, ``held_instances``; the metrics ``enclave_ingest_spool_*``), for an alert
    before the volume fills (docs/ingest.md § The spool's size)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        #: Bytes of sealed chunks held, per instance upload id (written from worker threads).
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(self._held.values())

    @property
    def held_instances(self) -> int:
        with self._lock:
            return len(self._held)

    def prepare(self) -> None:
        """Create the spool and forget what a previous run left (Kafka redelivers what was not committed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.clear()

    def _folder(self, instance_upload_id: str) -> Path:
        if not instance_upload_id or not set(instance_upload_id) <= _ID_CHARS or len(instance_upload_id) > 64:
            raise PermanentError("instance upload id is not an opaque id", code="contract_violation")
        return self.root / instance_upload_id

    def write(self, instance_upload_id: str, index: int, sealed: bytes, meta: dict[str, object]) -> None:
        folder = self._folder(instance_upload_id)
        folder.mkdir(exist_ok=True)
        tmp, final = folder / f"{index}.tmp", folder / f"{index}.sealed"
        tmp.write_bytes(sealed)
        try:
            replaced = final.stat().st_size  # a redelivered chunk overwrites the same file
        except FileNotFoundError:
            replaced = 0
        tmp.replace(final)
        with self._lock:
            self._held[instance_upload_id] = self._held.get(instance_upload_id, 0) + len(sealed) - replaced
        if index == 0 or not (folder / "meta.json").exists():
            (folder / "meta.json").write_text(json.dumps(meta))

    def meta(self, instance_upload_id: str) -> dict[str, object]:
        return dict(json.loads((self._folder(instance_upload_id) / "meta.json").read_text()))

    def chunks(self, instance_upload_id: str, count: int) -> Iterator[bytes]:
        """The sealed chunks in index order, one at a time."""
        folder = self._folder(instance_upload_id)
        for index in range(count):
            yield (folder / f"{index}.sealed").read_bytes()

    def discard(self, instance_upload_id: str) -> None:
        shutil.rmtree(self._folder(instance_upload_id), ignore_errors=True)
        with self._lock:
            self._held.pop(instance_upload_id, None)

    def clear(self) -> None:
        """Forget everything (on start: Kafka redelivers whatever was not committed)."""
        for child in self.root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        with self._lock:
            self._held.clear()


class OffsetTracker:
    """Per partition: the highest offset seen and the first offset of every unfinished instance."""

    def __init__(self, abandon_after_ms: int = 3_600_000) -> None:
        self.pending: dict[str, PendingInstance] = {}
        self._next: dict[tuple[str, int], int] = {}
        self.abandon_after_ms = abandon_after_ms

    def observe(
        self, partition: tuple[str, int], offset: int, timestamp_ms: int = 0
    ) -> list[PendingInstance]:
        """Note a record read from ``partition``; the unfinished instances it shows abandoned (see
        the module docstring). They are still tracked: the caller settles them, then ``finish``es them."""
        self._next[partition] = max(self._next.get(partition, 0), offset + 1)
        return [
            p
            for p in self.pending.values()
            if p.partition == partition
            and not p.complete
            and p.last_timestamp_ms + self.abandon_after_ms <= timestamp_ms
        ]

    def track(
        self,
        instance_upload_id: str,
        count: int,
        partition: tuple[str, int],
        offset: int,
        timestamp_ms: int = 0,
    ) -> PendingInstance:
        pending = self.pending.get(instance_upload_id)
        if pending is None:
            pending = PendingInstance(instance_upload_id, count, partition, offset)
            self.pending[instance_upload_id] = pending
        pending.last_timestamp_ms = max(pending.last_timestamp_ms, timestamp_ms)
        return pending

    def finish(self, instance_upload_id: str) -> None:
        self.pending.pop(instance_upload_id, None)

    def safe_offset(self, partition: tuple[str, int]) -> int | None:
        """The offset to commit: before the earliest unfinished instance, else after the last seen."""
        if partition not in self._next:
            return None
        firsts = [p.first_offset for p in self.pending.values() if p.partition == partition]
        return min(firsts) if firsts else self._next[partition]

    def forget_partitions(self, partitions: set[tuple[str, int]]) -> list[str]:
        """After a rebalance took partitions away: drop their state (the new owner redelivers)."""
        dropped = [i for i, p in self.pending.items() if p.partition in partitions]
        for instance_upload_id in dropped:
            del self.pending[instance_upload_id]
        for partition in partitions:
            self._next.pop(partition, None)
        return dropped
