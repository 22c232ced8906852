"""A request holds one spool file, whatever its part count (``SpoolFile`` in handoff.py).

Until the nineteenth session each instance that spilled past the spool's memory budgets kept an
unnamed file of its own open until the hand-off: a request of 300 small instances held 300 file
descriptors (measured below on the old code), one of 10,000 parts (``MAX_PARTS``) 10,000, and 128
uploads (``MAX_CONCURRENT_UPLOADS``) could exhaust the process's descriptors, failing every other
request and the Kafka and database sockets too. Now every spilled instance of a request lies at its
own extent of one file, read back by offset, and the disk budget counts what that file holds: an
instance refused half-way is cut off its end at once, and the file closes, with its descriptor and
its bytes, when the request ends."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from corpus import builders  # tests/conftest.py puts this directory on sys.path
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from enclave_common import topics
from enclave_common.crypto import Pseudonymizer
from enclave_common.crypto.sealing import InstanceUnsealer, SealContext
from enclave_common.envelope import Envelope
from enclave_common.events import UploadChunk, UploadReceived
from enclave_gateway.handoff import Handoff, SealedInstance, SpoolBudget, SpoolDiskBudget
from enclave_gateway.multipart import BodyLimits
from enclave_gateway.uploads import BodyPace, UploadProcessor
from enclave_gateway.validation import ValidationPolicy

CHUNK = 4096
KEY = X25519PrivateKey.generate()


def spool_files(path: Path) -> list[int]:
    """Descriptors this process holds on files under ``path`` (the spool's files are unnamed: their
    /proc/self/fd links read ``<dir>/#<inode> (deleted)``)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"{path}/"):
            found.append(int(fd))
    return found


def spooled_bytes(path: Path) -> int:
    """What the files under ``path`` this process holds open take, by their size."""
    return sum(os.fstat(fd).st_size for fd in spool_files(path))


class CountingPublisher:
    """Acknowledges every event at once, keeps it, and counts the spool's descriptors at each send
    (the hand-off reads the spilled chunks back between sends)."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.sent: list[tuple[str, Envelope]] = []
        self.descriptors_seen: list[int] = []

    async def send(self, topic: str, envelope: Envelope, *, key: str) -> asyncio.Future[Any]:
        self.sent.append((topic, envelope))
        self.descriptors_seen.append(len(spool_files(self.spool)))
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack


class RecordingReadModel:
    async def record_uploads(self, tenant: str, upload_id: str, instances: list[Any]) -> None:
        return None


def processor(spool: Path, publisher: CountingPublisher, disk: int | None = None) -> UploadProcessor:
    return UploadProcessor(
        recipient=KEY.public_key(),
        pseudonymizer=Pseudonymizer(bytes(32)),
        handoff=Handoff(publisher, timeout_s=5),  # type: ignore[arg-type]
        read_model=RecordingReadModel(),  # type: ignore[arg-type]
        limits=BodyLimits(max_parts=1000, max_instance_bytes=1 << 24, max_request_bytes=1 << 26),
        policy=ValidationPolicy(),
        spool_dir=spool,
        chunk_bytes=CHUNK,
        pace=BodyPace(idle_timeout_s=5),
        spool_memory_bytes=0,  # every sealed chunk spills to the spool directory
        spool_disk_bytes=disk,
    )


async def streamed(data: bytes) -> AsyncIterator[bytes]:
    for at in range(0, len(data), 65536):
        yield data[at : at + 65536]
        await asyncio.sleep(0)


def opened(tenant: str, instance_upload_id: str, pieces: list[bytes]) -> bytes:
    unsealer = InstanceUnsealer(KEY, SealContext(tenant, instance_upload_id))
    return b"".join(unsealer.unseal_chunk(piece) for piece in pieces)


async def test_a_request_of_300_spilled_instances_holds_one_spool_file_and_hands_off_each_whole(
    tmp_path: Path,
) -> None:
    # 297 instances of one chunk and 3 of four chunks (14 KiB of pixels), so extents differ in size.
    instances = [
        builders.make_instance(pixel_bytes=14 * 1024 if index % 100 == 50 else 64) for index in range(300)
    ]
    body = builders.multipart_body(instances)
    publisher = CountingPublisher(tmp_path)
    uploads = processor(tmp_path, publisher)

    result = await uploads.receive(body.content_type, streamed(body.data), tenant="hospital-a")
    assert len(result.accepted) == 300 and not any(part.sealed.in_memory for part in result.accepted)
    assert len(spool_files(tmp_path)) == 1, "one spool file for the whole request (was one per instance)"
    assert list(tmp_path.iterdir()) == [], "the spool file has no name in the spool directory"
    assert uploads.spool_disk.used == spooled_bytes(tmp_path) > 300 * 500, "the disk budget counts the file"

    await uploads.publish(result, tenant="hospital-a", actor="pacs-1")
    assert max(publisher.descriptors_seen) == 1, "the hand-off reads every instance from that one file"
    assert spool_files(tmp_path) == [] and uploads.spool_disk.used == 0, "closed and given back at the end"

    pieces: dict[str, list[bytes]] = {}
    received: dict[str, UploadReceived] = {}
    for topic, envelope in publisher.sent:
        if topic == topics.UPLOAD_CHUNK:
            chunk = UploadChunk.model_validate(envelope.data)
            assert chunk.index == len(pieces.setdefault(chunk.instance_upload_id, []))
            assert len(chunk.sealed) <= CHUNK + 200
            pieces[chunk.instance_upload_id].append(chunk.sealed)
        elif topic == topics.UPLOAD_RECEIVED:
            event = UploadReceived.model_validate(envelope.data)
            received[event.instance_upload_id] = event
    assert len(received) == 300
    by_digest = {hashlib.sha256(data).hexdigest(): data for data in instances}
    for instance_upload_id, event in received.items():
        assert len(pieces[instance_upload_id]) == event.chunk_count
        assert opened("hospital-a", instance_upload_id, pieces[instance_upload_id]) == by_digest[event.sha256]
    assert sorted(event.chunk_count for event in received.values()) == [1] * 297 + [4] * 3


async def test_an_instance_refused_half_way_is_cut_off_the_request_s_file_at_once(tmp_path: Path) -> None:
    good = [builders.make_instance(pixel_bytes=8 * 1024) for _ in range(3)]
    truncated = builders.truncate(builders.make_instance(pixel_bytes=8 * 1024), 6000)
    body = builders.multipart_body([good[0], truncated, good[1], truncated, good[2]])
    publisher = CountingPublisher(tmp_path)
    uploads = processor(tmp_path, publisher)

    result = await uploads.receive(body.content_type, streamed(body.data), tenant="hospital-a")
    assert [part.index for part in result.accepted] == [0, 2, 4]
    assert [part.index for part in result.failed] == [1, 3]
    assert len(spool_files(tmp_path)) == 1
    kept = sum(4 + len(piece) for part in result.accepted for piece in part.sealed.chunks())
    assert uploads.spool_disk.used == spooled_bytes(tmp_path) == kept, "nothing of the refused ones is held"
    await uploads.publish(result, tenant="hospital-a", actor="pacs-1")
    assert spool_files(tmp_path) == [] and uploads.spool_disk.used == 0


async def test_a_request_that_fails_or_is_abandoned_closes_its_spool_file(tmp_path: Path) -> None:
    body = builders.multipart_body([builders.make_instance() for _ in range(50)])
    uploads = processor(tmp_path, CountingPublisher(tmp_path))

    async def broken() -> AsyncIterator[bytes]:
        yield body.data[: len(body.data) // 2]
        raise ConnectionResetError("the client went away")

    with pytest.raises(ConnectionResetError):
        await uploads.receive(body.content_type, broken(), tenant="hospital-a")
    assert spool_files(tmp_path) == [] and uploads.spool_disk.used == 0

    result = await uploads.receive(body.content_type, streamed(body.data), tenant="hospital-a")
    assert len(spool_files(tmp_path)) == 1
    uploads.discard(result)  # answered without a hand-off (the request failed at the request level)
    assert spool_files(tmp_path) == [] and uploads.spool_disk.used == 0


def sealed(tmp_path: Path, data: bytes, budget: SpoolBudget, disk: SpoolDiskBudget) -> SealedInstance:
    instance = SealedInstance(KEY.public_key(), "hospital-a", tmp_path, CHUNK, budget, disk)
    instance.feed(data)
    instance.finish()
    return instance


def test_extents_given_back_before_the_end_keep_their_bytes_until_those_after_them_go(tmp_path: Path) -> None:
    disk = SpoolDiskBudget(None)
    budget = SpoolBudget(0)
    data = [os.urandom(size) for size in (3 * CHUNK, CHUNK, 2 * CHUNK + 5)]
    first, second, third = (sealed(tmp_path, each, budget, disk) for each in data)
    assert len(spool_files(tmp_path)) == 1
    whole = disk.used
    assert whole == spooled_bytes(tmp_path)

    second.discard()  # in the middle: the file cannot shrink yet
    assert disk.used == whole == spooled_bytes(tmp_path)
    assert opened("hospital-a", third.instance_upload_id, list(third.chunks())) == data[2]
    third.discard()  # the end, and the hole before it: cut off together
    assert disk.used == spooled_bytes(tmp_path) < whole
    assert opened("hospital-a", first.instance_upload_id, list(first.chunks())) == data[0]

    fourth = sealed(tmp_path, data[1], budget, disk)  # written where the others were
    assert len(spool_files(tmp_path)) == 1 and disk.used == spooled_bytes(tmp_path)
    assert opened("hospital-a", fourth.instance_upload_id, list(fourth.chunks())) == data[1]
    first.discard()
    assert disk.used == spooled_bytes(tmp_path)
    fourth.discard()
    fourth.discard()  # twice: nothing given back twice
    assert spool_files(tmp_path) == [] and disk.used == 0


def test_only_the_instance_spilled_last_may_append(tmp_path: Path) -> None:
    """A request's parts arrive one after another, so an instance's chunks lie together: a second
    instance that spilled while the first still grows is a bug, refused rather than interleaved."""
    budget, disk = SpoolBudget(0), SpoolDiskBudget(None)
    first = SealedInstance(KEY.public_key(), "hospital-a", tmp_path, CHUNK, budget, disk)
    first.feed(os.urandom(2 * CHUNK))
    second = sealed(tmp_path, os.urandom(CHUNK), budget, disk)
    with pytest.raises(RuntimeError, match="sealed one after another"):
        first.finish()
    second.discard()
    first.discard()
    assert spool_files(tmp_path) == [] and disk.used == 0


def test_instances_of_one_request_must_share_its_directory_and_disk_budget(tmp_path: Path) -> None:
    budget, disk = SpoolBudget(0), SpoolDiskBudget(None)
    first = sealed(tmp_path, os.urandom(CHUNK), budget, disk)
    with pytest.raises(ValueError, match="same spool directory and disk budget"):
        sealed(tmp_path, os.urandom(CHUNK), budget, SpoolDiskBudget(None))
    first.discard()
