"""The runbook's dead-letter tool (`enclave-dlq`, docs/operations.md "Replay a DLQ") on the real
stack: it finds a message ingest dead-lettered, and its replay reaches the consumer again (which
dead-letters it again: the cause is not fixed here). It reads the topic without a consumer group,
to the end offsets taken at its start; before the tenth session it stopped at the first quiet poll,
which on a production broker (a new group's initial rebalance delay) could be the first one. A
replay is audited: refused without an actor and a reason, and recorded in ``access.recorded``
before the first message is re-published and again with the count after."""

from __future__ import annotations

import subprocess

from enclave_common import topics
from enclave_common.envelope import new_event_id

from .support import admin_command, mr_instance, publish, read_all, sealed_chunk_envelopes

DLQ = topics.dlq(topics.UPLOAD_CHUNK)


def _dlq_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return admin_command("enclave-dlq", *args)


def _copies(event_id: str):
    return read_all(DLQ, lambda e: e.id == event_id, settle=2.0)


async def test_the_dlq_tool_lists_and_replays_what_a_consumer_dead_lettered():
    [chunk] = sealed_chunk_envelopes(
        mr_instance()[0], tenant="it-dlq-tool", upload_id=new_event_id(), chunk_bytes=1 << 20
    )
    inconsistent = chunk.model_copy(update={"data": {**chunk.data, "index": 5, "count": 3}})
    await publish(topics.UPLOAD_CHUNK, [inconsistent], key=chunk.data["instance_upload_id"])
    for _ in range(30):
        if await _copies(inconsistent.id):
            break
    assert len(await _copies(inconsistent.id)) == 1

    listed = _dlq_tool("inspect", DLQ, "--code", "contract_violation", "--group", "enclave-ingest")
    assert listed.returncode == 0, listed.stderr
    lines = [line for line in listed.stdout.splitlines() if f"id={inconsistent.id}" in line]
    assert len(lines) == 1 and "code=contract_violation" in lines[0] and "group=enclave-ingest" in lines[0]
    total = int(listed.stdout.splitlines()[-1].split()[0])
    assert total == len(listed.stdout.splitlines()) - 1 >= 1
    assert "it-dlq-tool" not in listed.stdout  # headers only, never the payload

    actor = f"user:it-sre-{new_event_id()}"
    selection = ("--code", "contract_violation", "--group", "enclave-ingest", "--actor", actor)
    unexplained = _dlq_tool("replay", DLQ, *selection, "--reason", "fixed")
    assert unexplained.returncode == 2 and "--reason must be 10 to 500 characters" in unexplained.stderr
    anonymous = _dlq_tool("replay", DLQ, "--reason", "ingest's contract check was fixed")
    assert anonymous.returncode == 2 and "--actor is required" in anonymous.stderr

    replayed = _dlq_tool("replay", DLQ, *selection, "--reason", "ingest's contract check was fixed")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.strip() == f"replayed {total} message(s)"
    records = await read_all(topics.ACCESS_RECORDED, lambda e: e.actor == actor, settle=2.0)
    assert [r.data["detail"] for r in records] == [
        "reason: ingest's contract check was fixed; started; code=contract_violation group=enclave-ingest",
        f"reason: ingest's contract check was fixed; replayed {total} message(s); "
        "code=contract_violation group=enclave-ingest",
    ]  # the refused attempts recorded nothing: they did nothing
    assert {(r.data["action"], r.data["target"], r.data["outcome"], r.tenant) for r in records} == {
        ("dlq_replay", f"topic:{DLQ}", "success", "*")
    }
    assert len({r.correlation_id for r in records}) == 1
    assert f"correlation id {records[0].correlation_id}" in replayed.stderr  # for the incident ticket
    for _ in range(30):
        if len(await _copies(inconsistent.id)) == 2:
            break
    assert len(await _copies(inconsistent.id)) == 2  # ingest handled it again: dead-lettered again

    absent = f"enclave.no-such-topic-{new_event_id()}.v1.dlq"
    missing = _dlq_tool("inspect", absent)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert _dlq_tool("inspect", absent).returncode == 2  # asking did not create it
