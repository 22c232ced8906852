"""The token revocations the audit API honours, taken from the events the audit service records.

An admin revokes a subject's tokens at the gateway (``POST /api/v1/token-revocations``); the gateway
records it as an access event before it makes it (action ``revoke_tokens``, detail ``tokens_revoked
subject=<sub> revoked_before=<instant>``, status 201, the admin's roles), and the audit service records
every access event. So the audit service needs no access to the gateway's database (the services share
nothing but Kafka): its consumer, having recorded such an event, stores the revocation in its own
database (collection ``token_revocations``, the same
:class:`~enclave_common.auth.token_revocations_mongo.MongoTokenRevocationStore` as the gateway's: one
document per tenant and subject, the latest instant kept), and every replica reads them all every
``ENCLAVE_AUDIT_TOKEN_REVOCATION_REFRESH_S`` into the
:class:`~enclave_common.auth.token_revocations.RevokedTokens` its guard checks. A small collection
and not a query of the trail: the trail grows without bound, and a MongoDB-wire server without the
index (FerretDB) would scan it every few seconds.

Every recorded revocation counts, also one the gateway then could not store (``tokens_not_revoked``,
``token_revocation_unknown``: the admin was answered 503 and told to retry): refusing the tokens an
admin meant to end is the safe side. A revocation reaches the audit API once Kafka delivered the
event and the consumer recorded it, usually within seconds of the gateway's answer.

What an event says is what its writer says (every service that may write ``access.recorded``: the
Kafka ACLs of deploy/k8s/base/kafka/users.yaml). So an instant later than when the audit service
recorded the event (its own clock, ``recorded_at``, plus the clock skew tolerated) is no revocation:
it would refuse the subject's future tokens, past the retention. Such a record, like one of the
action whose detail says ``tokens_revoked`` but does not read as a revocation, is logged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Final

import structlog
from enclave_common import topics
from enclave_common.auth.actions import Action
from enclave_common.auth.grants_mongo import aware_utc
from enclave_common.auth.roles import Role
from enclave_common.auth.token_revocations import TokenRevocation

from enclave_audit.records import AuditRecord

log = structlog.get_logger("enclave.audit")

_ACCESS_TYPE: Final = topics.event_type(topics.ACCESS_RECORDED)
#: What the gateway's route writes (token_revocations_api); the subject holds no space (SUBJECT_PATTERN).
_MADE_WORD: Final = "tokens_revoked"
_DETAIL: Final = re.compile(_MADE_WORD + r" subject=(?P<subject>\S+) revoked_before=(?P<instant>\S+)")


def revocation_recorded(record: Mapping[str, Any], *, skew: timedelta) -> TokenRevocation | None:
    """The revocation a stored audit record (its ``envelope`` and ``recorded_at``) records, or None
    when it records none: another event, another action, a refusal, a detail that does not read as
    one, or an instant later than the record was made (``recorded_at`` plus ``skew``)."""
    envelope = record.get("envelope") or {}
    data = envelope.get("data") or {}
    if (
        envelope.get("type") != _ACCESS_TYPE
        or data.get("action") != Action.REVOKE_TOKENS.value
        or data.get("status_code") != 201
        or Role.ADMIN.value not in (data.get("roles") or ())
    ):
        return None
    found = _DETAIL.fullmatch(str(data.get("detail") or ""))
    tenant = envelope.get("tenant")
    recorded_at = record.get("recorded_at")
    if found is None or not isinstance(tenant, str) or not isinstance(recorded_at, datetime):
        return None
    try:
        instant = aware_utc(datetime.fromisoformat(found["instant"]))
    except ValueError:
        return None
    if instant > aware_utc(recorded_at) + skew:
        return None
    return TokenRevocation(
        tenant=tenant,
        subject=found["subject"],
        revoked_before=instant,
        revoked_by=str(data.get("actor") or ""),
        justification="",  # the gateway keeps it; the trail never holds it
    )


def honoured_revocation(record: AuditRecord, *, skew: timedelta) -> TokenRevocation | None:
    """The revocation ``record`` makes the auditor API honour, or None; a record of the action that
    says ``tokens_revoked`` and is not honoured is logged (by its audit sequence, never its text).
    Runs on every record the consumer audits: any other record is passed over at once."""
    data = record.envelope.get("data") or {}
    if record.event_type != _ACCESS_TYPE or data.get("action") != Action.REVOKE_TOKENS.value:
        return None
    revocation = revocation_recorded(
        {"envelope": record.envelope, "recorded_at": record.recorded_at}, skew=skew
    )
    if revocation is None and str(data.get("detail") or "").startswith(f"{_MADE_WORD} "):
        log.error(
            "an audit record names a token revocation this service does not honour (not an admin's 201, "
            "an unreadable detail, or an instant after it was recorded)",
            sequence=record.sequence,
        )
    return revocation
