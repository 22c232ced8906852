"""The audit record: one per event, shaped after DICOM PS3.15 A.5 / IHE ATNA audit messages.

A record says what happened (event ID code, event type codes, action, outcome), who did it
(active participants with roles and network address), to what (participant objects named by
opaque ids or tenant-scoped pseudonyms, never by DICOM UIDs or patient identifiers) and when, and
keeps the sanitised original envelope. :func:`record_from_event` maps any ``enclave.*`` event to a
draft; unknown event types are audited too, as Application Activity.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from enclave_common import topics
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from enclave_audit import codes
from enclave_audit.codes import Code, EventAction, EventOutcome, ObjectKind
from enclave_audit.sanitize import sanitize_envelope

HEX_SHA256: Final = r"^[0-9a-f]{64}$"
MAX_OBJECT_ID_LENGTH: Final = 256


def utc_millis(value: datetime) -> datetime:
    """Normalise to UTC with millisecond precision, the precision a BSON date keeps.

    A naive datetime (as returned by pymongo without ``tz_aware``) is taken as UTC; this keeps the
    record hash stable across a store-and-load round trip.
    """
    aware = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return aware.replace(microsecond=(aware.microsecond // 1000) * 1000)


UtcMillis = Annotated[datetime, AfterValidator(utc_millis)]


class ActiveParticipant(BaseModel):
    """A user, service or process that took part (PS3.15 A.5.1 ActiveParticipant)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    user_id: str
    roles: tuple[str, ...] = ()
    role_codes: tuple[Code, ...] = ()
    is_requestor: bool = True
    network_address: str | None = None


class ParticipantObject(BaseModel):
    """A thing the event was about, by opaque id or pseudonym (PS3.15 A.5.1 ParticipantObject)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ObjectKind
    object_id: str = Field(max_length=MAX_OBJECT_ID_LENGTH)


class AuditRecordDraft(BaseModel):
    """An audit record before it is placed in the hash chain."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: str
    event_type: str
    topic: str
    dead_lettered: bool = False
    event_code: Code
    event_type_codes: tuple[Code, ...] = ()
    action: EventAction
    outcome: EventOutcome
    outcome_description: str | None = None
    event_time: UtcMillis
    recorded_at: UtcMillis
    source: str
    tenant: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    actor: str
    participants: tuple[ActiveParticipant, ...]
    objects: tuple[ParticipantObject, ...] = ()
    removed_fields: tuple[str, ...] = ()
    envelope: dict[str, Any]

    def object_ids(self, kind: ObjectKind) -> tuple[str, ...]:
        """The ids of participant objects of one kind (e.g. every study key this event touched)."""
        return tuple(o.object_id for o in self.objects if o.kind is kind)


class AuditRecord(AuditRecordDraft):
    """A record placed in the hash chain: its position, its predecessor's hash and its own hash."""

    sequence: int = Field(ge=1)
    prev_hash: str = Field(pattern=HEX_SHA256)
    record_hash: str = Field(pattern=HEX_SHA256)


@dataclass(frozen=True)
class _EventRule:
    code: Code
    action: EventAction
    outcome: EventOutcome = EventOutcome.SUCCESS
    type_codes: tuple[Code, ...] = ()


_T = topics.event_type
_RULES: Final[dict[str, _EventRule]] = {
    _T(topics.UPLOAD_CHUNK): _EventRule(codes.BEGIN_TRANSFERRING_INSTANCES, EventAction.EXECUTE),
    _T(topics.UPLOAD_RECEIVED): _EventRule(codes.INSTANCES_TRANSFERRED, EventAction.CREATE),
    _T(topics.UPLOAD_COMPLETED): _EventRule(codes.INSTANCES_TRANSFERRED, EventAction.CREATE),
    _T(topics.UPLOAD_REJECTED): _EventRule(
        codes.INSTANCES_TRANSFERRED, EventAction.CREATE, EventOutcome.MINOR_FAILURE
    ),
    _T(topics.INSTANCE_STORED): _EventRule(codes.INSTANCES_TRANSFERRED, EventAction.CREATE),
    _T(topics.INSTANCE_REJECTED): _EventRule(
        codes.INSTANCES_TRANSFERRED, EventAction.CREATE, EventOutcome.MINOR_FAILURE
    ),
    _T(topics.INSTANCE_DEIDENTIFIED): _EventRule(codes.INSTANCES_ACCESSED, EventAction.CREATE),
    _T(topics.INSTANCE_QUARANTINED): _EventRule(
        codes.INSTANCES_ACCESSED, EventAction.CREATE, EventOutcome.MINOR_FAILURE
    ),
    _T(topics.ANALYSIS_COMPLETED): _EventRule(codes.INSTANCES_ACCESSED, EventAction.EXECUTE),
    _T(topics.ANALYSIS_FAILED): _EventRule(
        codes.INSTANCES_ACCESSED, EventAction.EXECUTE, EventOutcome.SERIOUS_FAILURE
    ),
    _T(topics.KEY_CREATED): _EventRule(
        codes.SECURITY_ALERT, EventAction.CREATE, type_codes=(codes.SECURITY_CONFIGURATION,)
    ),
    _T(topics.KEY_ROTATED): _EventRule(
        codes.SECURITY_ALERT, EventAction.UPDATE, type_codes=(codes.SECURITY_CONFIGURATION,)
    ),
    _T(topics.KEY_SHREDDED): _EventRule(codes.STUDY_DELETED, EventAction.DELETE),
    _T(topics.SECURITY_ALERT): _EventRule(codes.SECURITY_ALERT, EventAction.EXECUTE),
}
_DEFAULT_RULE: Final = _EventRule(codes.APPLICATION_ACTIVITY, EventAction.EXECUTE)
_ACCESS_TYPE: Final = _T(topics.ACCESS_RECORDED)
_SECURITY_ALERT_TYPE: Final = _T(topics.SECURITY_ALERT)

#: Event ``data`` keys that name participant objects, and what they name.
_OBJECT_KEYS: Final[dict[str, ObjectKind]] = {
    "patient_key": ObjectKind.PATIENT,
    "patient_pseudonym": ObjectKind.PATIENT,
    "study_key": ObjectKind.STUDY,
    "study_keys": ObjectKind.STUDY,
    "series_key": ObjectKind.SERIES,
    "series_keys": ObjectKind.SERIES,
    "instance_key": ObjectKind.INSTANCE,
    "upload_id": ObjectKind.UPLOAD,
    "analysis_id": ObjectKind.ANALYSIS,
    "key_id": ObjectKind.KEY,
}

#: Path segments of access targets (``/studies/{k}/series/{k}``, ``study:{k}``) and their kind.
_TARGET_SEGMENTS: Final[dict[str, ObjectKind]] = {
    "patient": ObjectKind.PATIENT,
    "patients": ObjectKind.PATIENT,
    "patient_pseudonym": ObjectKind.PATIENT,
    "study": ObjectKind.STUDY,
    "studies": ObjectKind.STUDY,
    "series": ObjectKind.SERIES,
    "instance": ObjectKind.INSTANCE,
    "instances": ObjectKind.INSTANCE,
    "upload": ObjectKind.UPLOAD,
    "uploads": ObjectKind.UPLOAD,
    "analysis": ObjectKind.ANALYSIS,
    "analyses": ObjectKind.ANALYSIS,
    "report": ObjectKind.REPORT,
    "reports": ObjectKind.REPORT,
    "key": ObjectKind.KEY,
    "keys": ObjectKind.KEY,
}

_ACCESS_OUTCOMES: Final[dict[str, EventOutcome]] = {
    "success": EventOutcome.SUCCESS,
    "denied": EventOutcome.MINOR_FAILURE,
    "not_found": EventOutcome.MINOR_FAILURE,
    "unauthenticated": EventOutcome.MINOR_FAILURE,
    "rejected": EventOutcome.MINOR_FAILURE,
    "error": EventOutcome.SERIOUS_FAILURE,
}

_ALERT_SEVERITY_OUTCOMES: Final[dict[str, EventOutcome]] = {
    "low": EventOutcome.SUCCESS,
    "medium": EventOutcome.MINOR_FAILURE,
    "high": EventOutcome.SERIOUS_FAILURE,
    "critical": EventOutcome.MAJOR_FAILURE,
}

#: Alert rules whose security alert is an emergency override (break-glass): the audit service's and
#: deid's ``break_glass`` (an access under break-glass), the gateway's ``break_glass_opened`` (a
#: session opened). Not ``break_glass_refused``: a refused attempt overrode nothing.
BREAK_GLASS_RULES: Final = frozenset({"break_glass", "break_glass_opened", "emergency_override"})

_WORD = re.compile(r"[a-z0-9]+")
#: Action words of an access event that asks for an emergency override (break-glass).
BREAK_GLASS_WORDS: Final = ("break", "breakglass", "emergency")


def is_break_glass_action(action: object) -> bool:
    """Whether an access event's action word asks for break-glass."""
    return bool(set(_WORD.findall(str(action or "").lower())).intersection(BREAK_GLASS_WORDS))


def record_from_event(
    envelope: Mapping[str, Any], topic: str, *, received_at: datetime | None = None
) -> AuditRecordDraft:
    """Map one event (its envelope as a dict, and the topic it came from) to an audit record draft.

    Never refuses an event: unknown types become Application Activity, a missing id is derived
    from the envelope's content (so redelivery stays idempotent), a missing time falls back to
    ``received_at``. PHI-named fields are stripped and their paths listed in ``removed_fields``.
    """
    now = utc_millis(received_at or datetime.now(UTC))
    sanitized = sanitize_envelope(envelope)
    clean = sanitized.envelope
    data = clean.get("data") if isinstance(clean.get("data"), dict) else {}
    dead_lettered = topic.endswith(".dlq")
    event_type = _text(clean.get("type")) or topics.event_type(topic)

    if event_type == _ACCESS_TYPE:
        rule, outcome_description = _access_rule(data)
    else:
        rule = _RULES.get(event_type, _DEFAULT_RULE)
        outcome_description = _text(data.get("reason_code"))
        if event_type == _SECURITY_ALERT_TYPE:
            rule, outcome_description = _alert_rule(rule, data)
        elif rule is _DEFAULT_RULE and "outcome" in data:
            rule = _EventRule(rule.code, rule.action, _outcome_of(data.get("outcome")))
    if dead_lettered:
        rule = _EventRule(codes.APPLICATION_ACTIVITY, EventAction.EXECUTE, EventOutcome.SERIOUS_FAILURE)
        outcome_description = f"dead-lettered from {topic.removesuffix('.dlq')}"

    source = _text(clean.get("source")) or "unknown"
    actor = _text(data.get("actor")) if event_type == _ACCESS_TYPE else None
    actor = actor or _text(clean.get("actor")) or source
    participants = [
        ActiveParticipant(
            user_id=actor,
            roles=tuple(str(r) for r in data.get("roles") or () if isinstance(r, str)),
            network_address=_text(data.get("source_address")),
            is_requestor=True,
        )
    ]
    if source != actor:
        participants.append(
            ActiveParticipant(user_id=source, role_codes=(codes.ROLE_APPLICATION,), is_requestor=False)
        )

    return AuditRecordDraft(
        event_id=_text(clean.get("id")) or _derived_id(clean),
        event_type=event_type,
        topic=topic,
        dead_lettered=dead_lettered,
        event_code=rule.code,
        event_type_codes=rule.type_codes,
        action=rule.action,
        outcome=rule.outcome,
        outcome_description=outcome_description,
        event_time=_time(clean.get("time")) or now,
        recorded_at=now,
        source=source,
        tenant=_text(clean.get("tenant")),
        correlation_id=_text(clean.get("correlation_id")),
        causation_id=_text(clean.get("causation_id")),
        actor=actor,
        participants=tuple(participants),
        objects=tuple(_dedupe(_objects_of(data))),
        removed_fields=tuple(sanitized.removed_fields),
        envelope=clean,
    )


def _access_rule(data: Mapping[str, Any]) -> tuple[_EventRule, str | None]:
    """Code an ``access.recorded`` event from its action words (a plural as its singular:
    ``manage_grants`` is a grant) and outcome."""
    words = _WORD.findall(str(data.get("action") or "").lower())
    action_words = {*words, *(w.removesuffix("s") for w in words)}
    outcome_word = str(data.get("outcome") or "").lower()
    outcome = _outcome_of(data.get("outcome"))
    status = data.get("status_code")
    description = f"{outcome_word} ({status})" if status is not None else (outcome_word or None)

    def has(*words: str) -> bool:
        return bool(action_words.intersection(words))

    if outcome_word == "unauthenticated" or (
        # revoke_tokens is an admin ending a subject's tokens: a change of access (below), not a login
        has("login", "authenticate", "authentication", "token") and not has("revoke")
    ):
        code, action, types = codes.USER_AUTHENTICATION, EventAction.EXECUTE, (codes.LOGIN,)
    elif has("logout"):
        code, action, types = codes.USER_AUTHENTICATION, EventAction.EXECUTE, (codes.LOGOUT,)
    elif has(*BREAK_GLASS_WORDS):
        # Only an override that happened started one: a refused attempt is a security record with
        # its failure outcome, not "break-glass access used" (anomaly: ``break_glass_refused``).
        started = (codes.EMERGENCY_OVERRIDE_STARTED,) if outcome is EventOutcome.SUCCESS else ()
        code, action, types = codes.SECURITY_ALERT, EventAction.EXECUTE, started
    elif has("replay", "rerun"):
        # An operator command making the pipeline process stored data again (enclave-dlq replay,
        # enclave-analysis-rerun; enclave_common.operator_actions).
        code, action, types = codes.APPLICATION_ACTIVITY, EventAction.EXECUTE, ()
    elif has("audit"):
        code, action, types = codes.AUDIT_LOG_USED, EventAction.READ, ()
    elif has("export", "download"):
        code, action, types = codes.EXPORT, EventAction.READ, ()
    elif has("patient") and has("key"):
        # A patient id turned into its key (the gateway's query_patient_key, for an accounting of
        # disclosures): no PHI is read, so it is not coded as a query of patient data (110112).
        code, action, types = codes.APPLICATION_ACTIVITY, EventAction.EXECUTE, ()
    elif has("query", "search", "list", "qido"):
        code, action, types = codes.QUERY, EventAction.EXECUTE, ()
    elif has("grant", "restriction") and has("read"):
        # Reading a grant or the restricted patients (the gateway's read_grants, read_restrictions)
        # changes nothing; DICOM has no event for reading security attributes, so it is application
        # activity, action R, not 110137's change.
        code, action, types = codes.APPLICATION_ACTIVITY, EventAction.READ, ()
    elif has("grant", "revoke", "role", "restriction"):
        # A patient's restriction (manage_restrictions) changes who may read its PHI, as a grant does.
        code, action = codes.SECURITY_ALERT, EventAction.UPDATE
        types = (codes.USER_SECURITY_ATTRIBUTES_CHANGED,)
    elif has("upload", "stow", "store", "create"):
        code, action, types = codes.INSTANCES_TRANSFERRED, EventAction.CREATE, ()
    elif has("delete", "shred", "erase"):
        code, action, types = codes.STUDY_DELETED, EventAction.DELETE, ()
    else:
        code, action, types = codes.INSTANCES_ACCESSED, EventAction.READ, ()
    return _EventRule(code, action, outcome, types), description


def _alert_rule(base: _EventRule, data: Mapping[str, Any]) -> tuple[_EventRule, str | None]:
    """Code a ``security.alert``: break-glass is an emergency override; severity sets the outcome."""
    rule_name = str(data.get("rule") or "").lower()
    types = (codes.EMERGENCY_OVERRIDE_STARTED,) if rule_name in BREAK_GLASS_RULES else ()
    outcome = _ALERT_SEVERITY_OUTCOMES.get(str(data.get("severity") or "").lower(), EventOutcome.SUCCESS)
    return _EventRule(base.code, base.action, outcome, types), (rule_name or None)


def _outcome_of(value: Any) -> EventOutcome:
    """An EventOutcome from an access outcome word or a PS3.15 number; unknown values count as failures."""
    if isinstance(value, int) and not isinstance(value, bool) and value in EventOutcome._value2member_map_:
        return EventOutcome(value)
    return _ACCESS_OUTCOMES.get(str(value).lower(), EventOutcome.MINOR_FAILURE)


def _objects_of(data: Mapping[str, Any]) -> Iterator[ParticipantObject]:
    for key, kind in _OBJECT_KEYS.items():
        value = data.get(key)
        values = value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, str) and item:
                yield ParticipantObject(kind=kind, object_id=item[:MAX_OBJECT_ID_LENGTH])
    target = data.get("target")
    if isinstance(target, str) and target:
        yield from parse_access_target(target)
    elif isinstance(target, Mapping):
        yield from _objects_of(target)


def parse_access_target(target: str) -> list[ParticipantObject]:
    """Participant objects named by an access target (``study:K``, ``/studies/K/series/S``, ``/uploads/U``).

    The query string is dropped before anything is kept: it may carry search terms.
    """
    path = target.split("?", 1)[0].split("#", 1)[0]
    parts = [p for p in re.split(r"[/:]", path) if p]
    found: list[ParticipantObject] = []
    for i, part in enumerate(parts):
        kind = _TARGET_SEGMENTS.get(part.lower())
        if kind is not None and i + 1 < len(parts) and parts[i + 1].lower() not in _TARGET_SEGMENTS:
            found.append(ParticipantObject(kind=kind, object_id=parts[i + 1][:MAX_OBJECT_ID_LENGTH]))
    if not found and parts:
        kind = ObjectKind.AUDIT_LOG if parts[0].lower() == "audit" else ObjectKind.OTHER
        found.append(ParticipantObject(kind=kind, object_id=path[:MAX_OBJECT_ID_LENGTH]))
    return found


def _dedupe(objects: Iterator[ParticipantObject]) -> list[ParticipantObject]:
    seen: set[tuple[ObjectKind, str]] = set()
    out: list[ParticipantObject] = []
    for obj in objects:
        if (obj.kind, obj.object_id) not in seen:
            seen.add((obj.kind, obj.object_id))
            out.append(obj)
    return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def _derived_id(envelope: Mapping[str, Any]) -> str:
    """A stable id for an envelope without one: same content, same id, so redelivery dedupes."""
    digest = hashlib.sha256(json.dumps(envelope, sort_keys=True, default=str).encode()).hexdigest()
    return f"derived-{digest[:48]}"
