"""The audit record of an operator command (docs/operations.md, "Operator commands are audited").

A command that changes what the pipeline does with stored data (``enclave-dlq replay`` re-publishes
dead-lettered events and sealed chunks; ``enclave-analysis-rerun`` analyses finished series again)
publishes an ``access.recorded`` event naming the actor, the command's action, what it selected and
the operator's reason, and waits for Kafka's acknowledgement *before* it changes anything, as the
break-glass read does: no replay or re-run happens without a record. When the command then fails
part-way, it records a second event with outcome ``error`` saying how far it got. The reason is
free text checked like a grant's justification (10 to 500 characters; the reason, not the patient).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from enclave_common import topics
from enclave_common.auth.policy import check_justification
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.events import AccessOutcome, AccessRecorded
from enclave_common.kafka import EventPublisher, create_broker
from enclave_common.settings import BaseServiceSettings

#: The tenant of a command that is not about one tenant (as ingest's key commands' events); only
#: auditors of the operator tenant see such records.
ALL_TENANTS = "*"


class OperatorActionRefused(ValueError):
    """The command was not run: its actor or reason is missing or unusable."""


@dataclass(frozen=True)
class OperatorAction:
    """One run of an operator command: its access events share a correlation id."""

    source: str
    actor: str
    action: str
    target: str
    reason: str
    tenant: str = ALL_TENANTS
    correlation_id: str = field(default_factory=new_event_id)

    @classmethod
    def checked(
        cls, *, source: str, actor: str, action: str, target: str, reason: str, tenant: str | None = None
    ) -> OperatorAction:
        """Raises ``OperatorActionRefused`` (before anything is published) for a blank actor or a
        reason that is too short or too long."""
        if not actor.strip():
            raise OperatorActionRefused("--actor is required: who runs the command (e.g. user:sre-jane)")
        return cls(
            source=source,
            actor=actor.strip(),
            action=action,
            target=target,
            reason=check_justification(reason, OperatorActionRefused, what="--reason"),
            tenant=tenant or ALL_TENANTS,
        )

    @classmethod
    def from_command_line(
        cls,
        parser: argparse.ArgumentParser,
        args: argparse.Namespace,
        *,
        source: str,
        action: str,
        target: str,
    ) -> OperatorAction | None:
        """The run of a command whose arguments carry ``actor``, ``reason``, ``tenant`` and
        ``dry_run``: None for a dry run (not audited), else the checked action; an unusable actor or
        reason ends the command as a usage error (exit 2, nothing published)."""
        if args.dry_run:
            return None
        try:
            return cls.checked(
                source=source,
                actor=args.actor,
                action=action,
                target=target,
                reason=args.reason,
                tenant=args.tenant,
            )
        except OperatorActionRefused as exc:
            parser.error(str(exc))

    def event(
        self, *, outcome: AccessOutcome = "success", status_code: int = 200, detail: str = ""
    ) -> Envelope:
        data = AccessRecorded(
            actor=self.actor,
            roles=["operator"],
            action=self.action,
            target=self.target,
            outcome=outcome,
            status_code=status_code,
            detail=f"reason: {self.reason}" + (f"; {detail}" if detail else ""),
        )
        return Envelope.for_topic(
            topics.ACCESS_RECORDED,
            data,
            source=self.source,
            tenant=self.tenant,
            actor=self.actor,
            correlation_id=self.correlation_id,
        )


async def record(settings: BaseServiceSettings, envelope: Envelope) -> None:
    """Publish ``envelope`` to ``access.recorded`` and wait for Kafka's acknowledgement."""
    broker = create_broker(settings)
    try:
        await broker.start()
        await EventPublisher(broker).publish(topics.ACCESS_RECORDED, envelope, key=envelope.correlation_id)
    finally:
        await broker.stop()


async def record_start(settings: BaseServiceSettings, action: OperatorAction, detail: str) -> None:
    """The opening record (raises if Kafka cannot take it: the command must then not act), and the
    run's correlation id on stderr, for the incident ticket."""
    await record(settings, action.event(detail=detail))
    print(f"audit trail: {action.action} recorded, correlation id {action.correlation_id}", file=sys.stderr)


async def record_end(settings: BaseServiceSettings, envelope: Envelope) -> bool:
    """The closing record. If it cannot be published, stderr says so (with the correlation id) and
    False is returned instead of raising: the failure must neither hide the command's own error nor
    turn work that was done into a failed run."""
    try:
        await record(settings, envelope)
    except Exception as exc:
        print(
            f"warning: the audit trail lacks this run's closing record (correlation id "
            f"{envelope.correlation_id}): {type(exc).__name__}",
            file=sys.stderr,
        )
        return False
    return True
