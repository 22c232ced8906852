"""The sealed hand-off: the spool (memory within the request's budget, then files; a spool that
cannot be written is SpoolUnavailable) and the queued acknowledgements (all awaited before an
answer; any failure is KafkaUnavailable)."""

from __future__ import annotations

import asyncio
import errno
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from enclave_common.crypto.sealing import InstanceUnsealer, SealContext
from enclave_common.envelope import Envelope
from enclave_gateway.handoff import (
    PUBLISH_WINDOW,
    Handoff,
    KafkaUnavailable,
    SealedInstance,
    SpoolBudget,
    SpoolDiskBudget,
    SpoolUnavailable,
)

CHUNK = 4096


def sealed(tmp_path: Path, key: X25519PrivateKey, data: bytes, budget: SpoolBudget) -> SealedInstance:
    instance = SealedInstance(key.public_key(), "hospital-a", tmp_path, CHUNK, budget)
    for at in range(0, len(data), 1000):
        instance.feed(data[at : at + 1000])
    instance.finish()
    return instance


def opened(key: X25519PrivateKey, instance: SealedInstance) -> bytes:
    unsealer = InstanceUnsealer(key, SealContext("hospital-a", instance.instance_upload_id))
    return b"".join(unsealer.unseal_chunk(piece) for piece in instance.chunks())


def files_in(path: Path) -> int:
    """Open files of this process under ``path`` (the spool's files are unnamed: look at /proc)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(path))
    return count


def test_a_request_within_its_budget_stays_in_memory(tmp_path: Path) -> None:
    key = X25519PrivateKey.generate()
    data = os.urandom(3 * CHUNK + 17)
    instance = sealed(tmp_path, key, data, SpoolBudget(1024 * 1024))
    assert instance.in_memory
    assert files_in(tmp_path) == 0
    assert instance.count == 4
    assert opened(key, instance) == data
    instance.discard()


def test_past_the_budget_instances_spill_to_unnamed_files_that_close_with_them(tmp_path: Path) -> None:
    key = X25519PrivateKey.generate()
    budget = SpoolBudget(2 * CHUNK + 500)  # room for the first instance only
    first_data, second_data = os.urandom(CHUNK), os.urandom(3 * CHUNK)
    first = sealed(tmp_path, key, first_data, budget)
    second = sealed(tmp_path, key, second_data, budget)
    assert first.in_memory
    assert not second.in_memory
    assert files_in(tmp_path) == 1
    assert list(tmp_path.iterdir()) == [], "spilled ciphertext has no name in the spool directory"
    assert opened(key, first) == first_data
    assert opened(key, second) == second_data
    second.discard()
    first.discard()
    assert files_in(tmp_path) == 0


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spilling to the spool lands on /dev/full: every write fails with the kernel's own ENOSPC, as
    on a full disk."""

    def on_dev_full(**_: Any) -> BinaryIO:
        return open("/dev/full", "w+b", buffering=0)  # noqa: SIM115 - closed with the spool file

    monkeypatch.setattr(tempfile, "TemporaryFile", on_dev_full)


def test_a_full_spool_disk_is_spool_unavailable_naming_what_ran_out(tmp_path: Path, full_disk: None) -> None:
    with pytest.raises(SpoolUnavailable) as refused:
        sealed(tmp_path, X25519PrivateKey.generate(), os.urandom(3 * CHUNK), SpoolBudget(0))
    assert refused.value.code == "spool_unavailable"
    assert isinstance(refused.value.__cause__, OSError) and refused.value.__cause__.errno == errno.ENOSPC
    assert str(refused.value) == (
        "The gateway's spool ran out of local disk space, so the upload could not be held; nothing was "
        "accepted, retry later"
    )


def test_a_spool_directory_that_is_gone_is_spool_unavailable(tmp_path: Path) -> None:
    gone = tmp_path / "spool"  # removed under the running gateway (a cleaner of /tmp, say)
    with pytest.raises(SpoolUnavailable, match="spool could not be used"):
        sealed(gone, X25519PrivateKey.generate(), os.urandom(3 * CHUNK), SpoolBudget(0))


def test_the_spool_disk_budget_is_shared_by_requests_and_given_back_when_they_end(tmp_path: Path) -> None:
    """Past ENCLAVE_GATEWAY_SPOOL_DISK_BYTES an upload is refused (503 spool_unavailable, retry)
    instead of filling the spool volume, whose size limit the kubelet enforces by evicting the pod
    with every upload in flight on it."""
    key = X25519PrivateKey.generate()
    disk = SpoolDiskBudget(10 * CHUNK)
    first = SealedInstance(key.public_key(), "hospital-a", tmp_path, CHUNK, SpoolBudget(0), disk)
    data = os.urandom(6 * CHUNK)
    first.feed(data)
    first.finish()
    assert not first.in_memory and 6 * CHUNK < disk.used <= 7 * CHUNK
    second = SealedInstance(key.public_key(), "hospital-a", tmp_path, CHUNK, SpoolBudget(CHUNK + 100), disk)
    with pytest.raises(SpoolUnavailable, match="would pass its limit of 40960 bytes") as refused:
        second.feed(os.urandom(6 * CHUNK))
    assert refused.value.code == "spool_unavailable"
    second.discard()
    assert 6 * CHUNK < disk.used <= 7 * CHUNK  # only what the first holds
    assert opened(key, first) == data
    first.discard()
    first.discard()  # twice: nothing given back twice
    assert disk.used == 0
    third = sealed(tmp_path, key, os.urandom(9 * CHUNK), SpoolBudget(0))  # no disk budget: no limit
    assert not third.in_memory
    third.discard()


class FakePublisher:
    """DirectPublisher.send: queue, return the acknowledgement; acknowledged when the test says."""

    def __init__(self) -> None:
        self.queued: list[tuple[str, asyncio.Future[Any]]] = []
        self.refuse_send: Exception | None = None

    async def send(self, topic: str, envelope: Envelope, *, key: str) -> asyncio.Future[Any]:
        if self.refuse_send is not None:
            raise self.refuse_send
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queued.append((topic, ack))
        return ack

    def acknowledge_all(self) -> None:
        for _, ack in self.queued:
            if not ack.done():
                ack.set_result(None)


def envelope() -> Envelope:
    return Envelope(
        id="0190d5f0-0000-7000-8000-000000000000",
        type="enclave.test",
        source="gateway",
        tenant="hospital-a",
        actor="tester",
        correlation_id="upload",
        data={},
    )


async def test_settle_waits_for_every_queued_event() -> None:
    publisher = FakePublisher()
    acks = Handoff(publisher, timeout_s=5).acknowledgements()  # type: ignore[arg-type]
    for _ in range(3):
        await acks.send("t", envelope(), "k")
    settling = asyncio.ensure_future(acks.settle())
    await asyncio.sleep(0.01)
    assert not settling.done(), "queued is not acknowledged"
    publisher.acknowledge_all()
    await asyncio.wait_for(settling, 1)


async def test_at_most_the_window_of_chunks_waits_unacknowledged() -> None:
    publisher = FakePublisher()
    acks = Handoff(publisher, timeout_s=5).acknowledgements()  # type: ignore[arg-type]
    for _ in range(PUBLISH_WINDOW):
        await acks.send("chunks", envelope(), "k", windowed=True)
    blocked = asyncio.ensure_future(acks.send("chunks", envelope(), "k", windowed=True))
    await asyncio.sleep(0.01)
    assert not blocked.done() and len(publisher.queued) == PUBLISH_WINDOW
    publisher.queued[0][1].set_result(None)
    await asyncio.wait_for(blocked, 1)
    assert len(publisher.queued) == PUBLISH_WINDOW + 1


KafkaError = type("KafkaError", (Exception,), {"__module__": "aiokafka.errors"})


@pytest.mark.parametrize("failure", [ConnectionError("refused"), TimeoutError(), KafkaError()])
async def test_a_failed_acknowledgement_is_kafka_unavailable(failure: Exception) -> None:
    publisher = FakePublisher()
    acks = Handoff(publisher, timeout_s=5).acknowledgements()  # type: ignore[arg-type]
    await acks.send("t", envelope(), "k")
    await acks.send("t", envelope(), "k")
    publisher.queued[0][1].set_exception(failure)
    with pytest.raises(KafkaUnavailable):
        await acks.settle()


async def test_a_refused_send_is_kafka_unavailable() -> None:
    publisher = FakePublisher()
    publisher.refuse_send = ConnectionError("no broker")
    acks = Handoff(publisher, timeout_s=5).acknowledgements()  # type: ignore[arg-type]
    with pytest.raises(KafkaUnavailable):
        await acks.send("t", envelope(), "k")


async def test_an_acknowledgement_that_never_comes_times_out_as_kafka_unavailable() -> None:
    publisher = FakePublisher()
    acks = Handoff(publisher, timeout_s=0.05).acknowledgements()  # type: ignore[arg-type]
    await acks.send("t", envelope(), "k")
    with pytest.raises(KafkaUnavailable):
        await acks.settle()
