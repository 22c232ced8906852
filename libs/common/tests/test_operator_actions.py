"""Operator commands' audit records (enclave_common.operator_actions) and the refusals that keep a
command from acting unrecorded."""

from __future__ import annotations

import pytest
from enclave_common import dlq_cli
from enclave_common.events import AccessRecorded
from enclave_common.operator_actions import ALL_TENANTS, OperatorAction, OperatorActionRefused

REASON = "the contract check of ingest was fixed"


def _action(**overrides: str) -> OperatorAction:
    fields = {
        "source": "enclave-dlq",
        "actor": "user:sre-jane",
        "action": "dlq_replay",
        "target": "topic:t.dlq",
    }
    return OperatorAction.checked(**{**fields, "reason": REASON, **overrides})


def test_a_checked_action_records_who_what_and_why_in_an_access_event():
    action = _action(reason=f"  {REASON}\n")
    started, finished = action.event(detail="started"), action.event(detail="replayed 3 message(s)")
    assert started.type == finished.type and started.correlation_id == finished.correlation_id != ""
    assert started.id != finished.id
    data = AccessRecorded.model_validate(started.data)
    assert (data.actor, data.action, data.target, data.outcome, data.status_code) == (
        "user:sre-jane",
        "dlq_replay",
        "topic:t.dlq",
        "success",
        200,
    )
    assert data.detail == f"reason: {REASON}; started"  # whitespace collapsed
    assert (started.source, started.tenant, started.actor) == ("enclave-dlq", ALL_TENANTS, "user:sre-jane")
    failed = AccessRecorded.model_validate(action.event(outcome="error", status_code=500, detail="x").data)
    assert (failed.outcome, failed.status_code) == ("error", 500)


def test_each_run_has_its_own_correlation_id_and_a_tenant_when_it_is_about_one():
    first, second = _action(), _action(tenant="hospital-a")
    assert first.correlation_id != second.correlation_id
    assert second.event().tenant == "hospital-a"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"actor": "  "}, "--actor is required"),
        ({"reason": ""}, "--reason must be 10 to 500 characters (got 0)"),
        ({"reason": "fixed"}, "--reason must be 10 to 500 characters (got 5)"),
        ({"reason": "x" * 501}, "--reason must be 10 to 500 characters (got 501)"),
    ],
)
def test_a_missing_actor_or_an_unusable_reason_is_refused(overrides, message):
    with pytest.raises(OperatorActionRefused, match=message.replace("(", r"\(").replace(")", r"\)")):
        _action(**overrides)


async def test_the_dlq_tool_refuses_a_replay_without_actor_or_reason_before_touching_kafka(
    capsys, monkeypatch
):
    # An address nothing listens on: the refusal must come before any connection.
    monkeypatch.setenv("ENCLAVE_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9")
    assert await dlq_cli.run(["replay", "enclave.upload.chunk.v1.dlq", "--reason", REASON]) == 2
    assert "refused: --actor is required" in capsys.readouterr().err
    assert await dlq_cli.run(["replay", "enclave.upload.chunk.v1.dlq", "--actor", "user:sre-jane"]) == 2
    assert "refused: --reason must be 10 to 500 characters" in capsys.readouterr().err
