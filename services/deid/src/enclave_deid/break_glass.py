"""The audited break-glass read of the linkage (pseudonym -> original identifiers).

The only way to decrypt linkage records: a named actor gives a justification; an ``access.recorded``
event (action ``break_glass_linkage``) and a ``security.alert`` (rule ``break_glass``) are published and
acknowledged by Kafka *before* anything is decrypted, so no disclosure escapes the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from enclave_common import topics
from enclave_common.auth.policy import check_justification as check_justification_text
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.errors import PermanentError
from enclave_common.events import AccessRecorded, SecurityAlert
from enclave_common.kafka import EventPublisher

from enclave_deid.linkage import LinkageVault

ACTION = "break_glass_linkage"
ALERT_RULE = "break_glass"
SOURCE = "deid"


class BreakGlassRefused(PermanentError):
    code = "break_glass_refused"


@dataclass
class LinkageDisclosure:
    """What the break-glass read returns: the patient's original identifiers and per-instance UID maps."""

    session_id: str
    tenant: str
    patient_pseudonym: str
    records: list[dict[str, Any]] = field(repr=False)

    def __repr__(self) -> str:
        return f"LinkageDisclosure(session_id={self.session_id!r}, records=<{len(self.records)} PHI records>)"


def check_justification(text: str) -> str:
    return check_justification_text(text, BreakGlassRefused)


def linkage_target(patient_pseudonym: str, docs: list[dict[str, Any]]) -> str:
    """The access record's target: the pseudonym read, then the upload-side patient key of each
    record found (``patient_pseudonym:P/patient:K``), so the disclosure is in the trail of the key
    the gateway answers with as well (records stored before the sixteenth session have none)."""
    keys = sorted({doc["patient_key"] for doc in docs if doc.get("patient_key")})
    return f"patient_pseudonym:{patient_pseudonym}" + "".join(f"/patient:{key}" for key in keys)


async def read_linkage(
    *,
    vault: LinkageVault,
    publisher: EventPublisher,
    tenant: str,
    patient_pseudonym: str,
    actor: str,
    justification: str,
    roles: tuple[str, ...] = (),
) -> LinkageDisclosure:
    """Record the access and raise the alert, then decrypt the linkage of ``patient_pseudonym`` in ``tenant``.

    Raises ``BreakGlassRefused`` without publishing when the actor, tenant or justification is missing.
    An unknown pseudonym is recorded too (outcome ``not_found``) and returns no records.
    """
    if not actor.strip() or not tenant.strip() or not patient_pseudonym.strip():
        raise BreakGlassRefused("actor, tenant and patient pseudonym are all required")
    reason = check_justification(justification)
    docs = await vault.find(tenant, patient_pseudonym)
    session_id = new_event_id()
    found = bool(docs)
    access = AccessRecorded(
        actor=actor,
        roles=list(roles),
        action=ACTION,
        target=linkage_target(patient_pseudonym, docs),
        outcome="success" if found else "not_found",
        status_code=200 if found else 404,
        detail=f"justification: {reason}",
    )
    alert = SecurityAlert(
        rule=ALERT_RULE,
        severity="high",
        subject=actor,
        detail=(
            f"break-glass read of the linkage of patient pseudonym {patient_pseudonym} "
            f"({len(docs)} records); justification: {reason}"
        ),
    )
    for topic, data in ((topics.ACCESS_RECORDED, access), (topics.SECURITY_ALERT, alert)):
        envelope = Envelope.for_topic(
            topic, data, source=SOURCE, tenant=tenant, actor=actor, correlation_id=session_id
        )
        await publisher.publish(topic, envelope, key=session_id)
    return LinkageDisclosure(session_id, tenant, patient_pseudonym, await vault.disclose(docs))
