"""The process-wide cap on sealed bytes kept in memory (``ENCLAVE_GATEWAY_SPOOL_MEMORY_TOTAL_BYTES``).

Each request may keep ``SPOOL_MEMORY_BYTES`` of sealed chunks in memory; until the seventeenth
session nothing bounded their sum, so 60 slow uploads of a 3.9 MiB instance took the gateway's memory
up by 260 MiB (about 200 would pass its 1 Gi limit). Past the shared budget, chunks spill to the disk
spool like past the request's own budget (or the upload answers 503 ``spool_unavailable`` when the
disk spool is full too); what an instance held is given back when it spills, is discarded, or its
request ends, fails or is abandoned."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from corpus import builders as corpus  # tests/conftest.py puts this directory on sys.path
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from enclave_common.crypto import Pseudonymizer
from enclave_common.crypto.sealing import InstanceUnsealer, SealContext
from enclave_common.envelope import Envelope
from enclave_gateway.config import GatewaySettings
from enclave_gateway.handoff import (
    DEFAULT_SPOOL_MEMORY_TOTAL_BYTES,
    Handoff,
    SealedInstance,
    SpoolBudget,
    SpoolMemoryBudget,
    SpoolUnavailable,
)
from enclave_gateway.multipart import BodyLimits
from enclave_gateway.uploads import BodyPace, UploadProcessor, UploadResult
from enclave_gateway.validation import ValidationPolicy

CHUNK = 16 * 1024
KEY = X25519PrivateKey.generate()


class AckingPublisher:
    async def send(self, topic: str, envelope: Envelope, *, key: str) -> asyncio.Future[Any]:
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack


class RecordingReadModel:
    async def record_uploads(self, tenant: str, upload_id: str, instances: list[Any]) -> None:
        return None


def processor(tmp_path: Path, *, total: int, disk: int | None = None) -> UploadProcessor:
    return UploadProcessor(
        recipient=KEY.public_key(),
        pseudonymizer=Pseudonymizer(bytes(32)),
        handoff=Handoff(AckingPublisher(), timeout_s=5),  # type: ignore[arg-type]
        read_model=RecordingReadModel(),  # type: ignore[arg-type]
        limits=BodyLimits(max_parts=10, max_instance_bytes=1 << 24, max_request_bytes=1 << 26),
        policy=ValidationPolicy(),
        spool_dir=tmp_path,
        chunk_bytes=CHUNK,
        pace=BodyPace(idle_timeout_s=5),
        spool_memory_bytes=1 << 20,  # each request alone could keep its instance in memory
        spool_disk_bytes=disk,
        spool_memory_total_bytes=total,
    )


def opened(instance: SealedInstance) -> bytes:
    unsealer = InstanceUnsealer(KEY, SealContext("hospital-a", instance.instance_upload_id))
    return b"".join(unsealer.unseal_chunk(piece) for piece in instance.chunks())


async def body(
    data: bytes, *, hold_before_last: asyncio.Event | None = None, fail: bool = False
) -> AsyncIterator[bytes]:
    """``data`` in pieces; with ``hold_before_last``, waits for it before the last byte (a slow
    client still sending); with ``fail``, the connection breaks there instead."""
    for at in range(0, len(data) - 1, 8192):
        yield data[at : min(at + 8192, len(data) - 1)]
        await asyncio.sleep(0)
    if hold_before_last is not None:
        await hold_before_last.wait()
    if fail:
        raise ConnectionResetError("the client went away")
    yield data[-1:]


async def holding(shared: SpoolMemoryBudget, size: int) -> int:
    """Wait until requests in flight hold ``size`` bytes of the shared budget; what they hold."""
    for _ in range(10_000):
        if shared.used >= size:
            return shared.used
        await asyncio.sleep(0)
    raise AssertionError(f"the requests in flight hold {shared.used} bytes of memory, not {size}")


INSTANCE = corpus.make_instance(pixel_bytes=64 * 1024)  # about 5 sealed chunks of 16 KiB


async def test_a_second_upload_past_the_shared_budget_spills_to_disk_and_loses_nothing(
    tmp_path: Path,
) -> None:
    uploads = processor(tmp_path, total=80 * 1024)  # one instance's sealed chunks, not two
    shared = uploads.spool_memory
    hold = asyncio.Event()
    first_task = asyncio.ensure_future(
        uploads.receive("application/dicom", body(INSTANCE, hold_before_last=hold), tenant="hospital-a")
    )
    held = await holding(shared, 4 * CHUNK)  # the first request holds 4 sealed chunks, still sending
    second = await uploads.receive("application/dicom", body(INSTANCE), tenant="hospital-a")
    [part] = second.accepted
    assert not part.sealed.in_memory, "past the shared budget the second request's instance is on disk"
    assert shared.used == held, "what it held in memory before spilling was given back"
    hold.set()
    first: UploadResult = await first_task
    [first_part] = first.accepted
    assert first_part.sealed.in_memory
    assert opened(first_part.sealed) == INSTANCE
    assert opened(part.sealed) == INSTANCE
    assert 0 < shared.used <= 80 * 1024
    await uploads.publish(second, tenant="hospital-a", actor="pacs-1")
    await uploads.publish(first, tenant="hospital-a", actor="pacs-1")
    assert shared.used == 0, "the budget is given back when the requests end"


async def test_without_room_on_disk_either_the_upload_is_spool_unavailable_and_keeps_nothing(
    tmp_path: Path,
) -> None:
    uploads = processor(tmp_path, total=80 * 1024, disk=2 * CHUNK)
    shared = uploads.spool_memory
    hold = asyncio.Event()
    first_task = asyncio.ensure_future(
        uploads.receive("application/dicom", body(INSTANCE, hold_before_last=hold), tenant="hospital-a")
    )
    held = await holding(shared, 4 * CHUNK)
    with pytest.raises(SpoolUnavailable) as refused:
        await uploads.receive("application/dicom", body(INSTANCE), tenant="hospital-a")
    assert refused.value.code == "spool_unavailable"  # 503 with Retry-After (api.py's _unavailable)
    assert shared.used == held and uploads.spool_disk.used == 0
    hold.set()
    first = await first_task
    assert opened(first.accepted[0].sealed) == INSTANCE
    uploads.discard(first)
    assert shared.used == 0


async def test_the_budget_is_given_back_when_a_request_fails_or_is_abandoned(tmp_path: Path) -> None:
    uploads = processor(tmp_path, total=1 << 20)
    shared = uploads.spool_memory
    hold = asyncio.Event()
    hold.set()
    with pytest.raises(ConnectionResetError):
        await uploads.receive(
            "application/dicom", body(INSTANCE, hold_before_last=hold, fail=True), tenant="t"
        )
    assert shared.used == 0
    # Cancelled while it holds sealed chunks (the server stopping, the client gone).
    never = asyncio.Event()
    task = asyncio.ensure_future(
        uploads.receive("application/dicom", body(INSTANCE, hold_before_last=never), tenant="t")
    )
    await holding(shared, 4 * CHUNK)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert shared.used == 0
    # An instance refused half-way (truncated) gives its chunks back at once; the request goes on.
    truncated = INSTANCE[:-100]
    result = await uploads.receive("application/dicom", body(truncated), tenant="t")
    assert not result.accepted and result.failed[0].failure.problem == "truncated"
    assert shared.used == 0


def test_a_shared_budget_is_drawn_on_by_each_request_budget(tmp_path: Path) -> None:
    shared = SpoolMemoryBudget(3 * CHUNK)
    first, second = SpoolBudget(2 * CHUNK, shared), SpoolBudget(2 * CHUNK, shared)
    assert first.take(2 * CHUNK)
    assert not second.take(2 * CHUNK), "the process has room for one more chunk only"
    assert second.remaining == 2 * CHUNK, "a refused take costs the request nothing"
    assert second.take(CHUNK)
    assert shared.used == 3 * CHUNK
    first.release(2 * CHUNK)
    assert shared.used == CHUNK
    assert SpoolBudget(CHUNK).take(CHUNK)  # without a shared budget: the request's own only


def test_the_setting_and_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings().spool_memory_total_bytes == DEFAULT_SPOOL_MEMORY_TOTAL_BYTES == 256 * 1024 * 1024
    monkeypatch.setenv("ENCLAVE_GATEWAY_SPOOL_MEMORY_TOTAL_BYTES", "0")  # everything spills to disk
    assert GatewaySettings().spool_memory_total_bytes == 0
