"""FHIR R4 AuditEvent representation of audit records, and searchset Bundles of them.

Resources are built as plain dicts (fast, no model round trip on the query path);
:func:`validate_fhir` checks them with ``fhir.resources``' R4B models (AuditEvent and Bundle are
unchanged between R4 and R4B), which the tests run on every shape produced here. Participant
objects are identified by Enclave's pseudonymous keys under ``urn:enclave:`` identifier systems.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final

from enclave_audit.codes import DCM, OBJECT_CODING, Code
from enclave_audit.records import ActiveParticipant, AuditRecord, ParticipantObject

FHIR_JSON: Final = "application/fhir+json"
DCM_SYSTEM: Final = "http://dicom.nema.org/resources/ontology/DCM"
RFC_3881_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/rfc3881"
ENTITY_TYPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE_DISPLAY: Final = {1: "Person", 2: "System Object", 3: "Organization", 4: "Other"}
OBJECT_ROLE_DISPLAY: Final = {
    1: "Patient",
    3: "Report",
    4: "Domain Resource",
    13: "Security Resource",
    20: "Job",
    24: "Query",
}
#: A FHIR id (R4: 1-64 of A-Z, a-z, 0-9, '-' and '.').
FHIR_ID_PATTERN: Final = r"^[A-Za-z0-9\-.]{1,64}$"
_FHIR_ID = re.compile(FHIR_ID_PATTERN)


def fhir_id(record: AuditRecord) -> str:
    """The resource id: the event id when FHIR allows it as an id, else ``seq-<sequence>``."""
    return record.event_id if _FHIR_ID.match(record.event_id) else f"seq-{record.sequence}"


def to_fhir_audit_event(record: AuditRecord) -> dict[str, Any]:
    """One audit record as a FHIR R4 AuditEvent resource (JSON-ready dict)."""
    resource: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": fhir_id(record),
        "type": _coding(record.event_code),
        "action": record.action.value,
        "period": {"start": _instant(record.event_time), "end": _instant(record.event_time)},
        "recorded": _instant(record.recorded_at),
        "outcome": str(int(record.outcome)),
        "agent": [_agent(p) for p in record.participants],
        "source": {
            "observer": {"display": f"enclave/{record.source}"},
            "type": [{"system": SOURCE_TYPE_SYSTEM, "code": "4", "display": "Application Server"}],
        },
    }
    if record.event_type_codes:
        resource["subtype"] = [_coding(c) for c in record.event_type_codes]
    if record.outcome_description:
        resource["outcomeDesc"] = record.outcome_description
    if record.tenant:
        resource["source"]["site"] = record.tenant
    entities = [_entity(o) for o in record.objects]
    if record.correlation_id:
        entities.append(
            {
                "what": {"identifier": {"system": "urn:enclave:correlation", "value": record.correlation_id}},
                "type": {"system": ENTITY_TYPE_SYSTEM, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLE_SYSTEM, "code": "20", "display": "Job"},
                "description": "correlation id (the upload this event belongs to)",
            }
        )
    if entities:
        resource["entity"] = entities
    return resource


def to_fhir_bundle(
    records: Iterable[AuditRecord],
    *,
    base_url: str,
    self_url: str | None = None,
    next_url: str | None = None,
    total: int | None = None,
) -> dict[str, Any]:
    """A ``searchset`` Bundle of AuditEvents, with ``self``/``next`` links for cursor pagination."""
    entries = []
    for record in records:
        resource = to_fhir_audit_event(record)
        entries.append(
            {
                "fullUrl": f"{base_url.rstrip('/')}/AuditEvent/{resource['id']}",
                "resource": resource,
                "search": {"mode": "match"},
            }
        )
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "entry": entries}
    links = [{"relation": rel, "url": url} for rel, url in (("self", self_url), ("next", next_url)) if url]
    if links:
        bundle["link"] = links
    if total is not None:
        bundle["total"] = total
    return bundle


#: R4 IssueSeverity and IssueType (both required bindings of OperationOutcome.issue).
ISSUE_SEVERITIES: Final = frozenset({"fatal", "error", "warning", "information"})
ISSUE_TYPES: Final = frozenset(
    {
        "invalid",
        "structure",
        "required",
        "value",
        "invariant",
        "security",
        "login",
        "unknown",
        "expired",
        "forbidden",
        "suppressed",
        "processing",
        "not-supported",
        "duplicate",
        "multiple-matches",
        "not-found",
        "deleted",
        "too-long",
        "code-invalid",
        "extension",
        "too-costly",
        "business-rule",
        "conflict",
        "transient",
        "lock-error",
        "no-store",
        "exception",
        "timeout",
        "incomplete",
        "throttled",
        "informational",
    }
)


def validate_fhir(resource: dict[str, Any]) -> None:
    """Raise ``ValueError`` (pydantic's ValidationError is one) unless ``resource`` is a valid R4 resource.

    ``fhir.resources`` checks structure and cardinality but not required value-set bindings, so
    the codes R4 binds as *required* (action, outcome) are checked here by hand.
    """
    from fhir.resources.R4B.auditevent import AuditEvent
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.operationoutcome import OperationOutcome

    kind = resource.get("resourceType")
    if kind == "AuditEvent":
        AuditEvent.model_validate(resource)
        _check_required_bindings(resource)
    elif kind == "Bundle":
        Bundle.model_validate(resource)
        for entry in resource.get("entry", []):
            _check_required_bindings(entry["resource"])
    elif kind == "OperationOutcome":
        OperationOutcome.model_validate(resource)
        for issue in resource["issue"]:
            if issue["severity"] not in ISSUE_SEVERITIES or issue["code"] not in ISSUE_TYPES:
                raise ValueError(
                    f"issue severity/code {issue['severity']}/{issue['code']} outside R4's required sets"
                )
    else:
        raise ValueError(
            f"resourceType {kind!r} is not produced here; expected AuditEvent, Bundle or OperationOutcome"
        )


def _check_required_bindings(event: dict[str, Any]) -> None:
    if event.get("action") not in {"C", "R", "U", "D", "E"}:
        raise ValueError(f"AuditEvent.action {event.get('action')!r} is not one of C, R, U, D, E")
    if event.get("outcome") not in {"0", "4", "8", "12"}:
        raise ValueError(f"AuditEvent.outcome {event.get('outcome')!r} is not one of 0, 4, 8, 12")
    for agent in event["agent"]:
        network = agent.get("network")
        if network and network.get("type") not in {None, "1", "2", "3", "4", "5"}:
            raise ValueError(f"AuditEvent.agent.network.type {network.get('type')!r} is not one of 1..5")


def _coding(code: Code) -> dict[str, str]:
    system = DCM_SYSTEM if code.system == DCM else RFC_3881_SYSTEM
    return {"system": system, "code": code.code, "display": code.display}


def _instant(value: datetime) -> str:
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _agent(participant: ActiveParticipant) -> dict[str, Any]:
    agent: dict[str, Any] = {
        "who": {"identifier": {"system": "urn:enclave:principal", "value": participant.user_id}},
        "requestor": participant.is_requestor,
    }
    if participant.role_codes:
        agent["type"] = {"coding": [_coding(c) for c in participant.role_codes]}
    if participant.roles:
        agent["role"] = [{"text": role} for role in participant.roles]
    if participant.network_address:
        agent["network"] = {
            "address": participant.network_address,
            "type": "2" if _is_ip(participant.network_address) else "1",
        }
    return agent


def _entity(obj: ParticipantObject) -> dict[str, Any]:
    type_code, role, _ = OBJECT_CODING[obj.kind]
    return {
        "what": {"identifier": {"system": f"urn:enclave:{obj.kind.value}", "value": obj.object_id}},
        "type": {
            "system": ENTITY_TYPE_SYSTEM,
            "code": str(int(type_code)),
            "display": ENTITY_TYPE_DISPLAY[int(type_code)],
        },
        "role": {
            "system": OBJECT_ROLE_SYSTEM,
            "code": str(int(role)),
            "display": OBJECT_ROLE_DISPLAY[int(role)],
        },
    }


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True
