"""FHIR R4 search parameters of ``GET /audit/fhir/AuditEvent`` turned into an
:class:`~enclave_audit.store.EventQuery`'s filters (the IHE RESTful ATNA profile, ITI-81, is a FHIR search of AuditEvent).

Only what maps onto the trail's filters is taken: ``date`` (with the prefixes ``eq``, ``ge``, ``gt``,
``le``, ``lt`` and FHIR's precision ranges: ``date=2026-11-23`` is that whole day), ``type`` and
``subtype`` (DCM codes, as ``code`` or ``system|code``), ``action``, ``outcome``, and by identifier
(``agent:identifier``, ``patient:identifier``, ``entity:identifier``, the identifiers the resources
carry). Anything else is refused (the common 422): a filter ignored would answer more than was asked.
Written by hand: the FHIR libraries on PyPI model resources, not a server's search parsing.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Final

from enclave_audit.codes import EventAction, EventOutcome
from enclave_audit.fhir import DCM_SYSTEM, RFC_3881_SYSTEM
from enclave_audit.store import EventQuery, Order

#: The identifier systems the AuditEvents carry (fhir.py): the principal, and each object kind.
PRINCIPAL_SYSTEM: Final = "urn:enclave:principal"
PATIENT_SYSTEM: Final = "urn:enclave:patient"
STUDY_SYSTEM: Final = "urn:enclave:study"
OUTCOME_SYSTEM: Final = "http://hl7.org/fhir/audit-event-outcome"
ACTION_SYSTEM: Final = "http://hl7.org/fhir/audit-event-action"

_PREFIXES: Final = ("eq", "ge", "gt", "le", "lt")
# A FHIR date or dateTime: YYYY, YYYY-MM, YYYY-MM-DD, or a time to the second or a fraction, with a
# zone (Z or +hh:mm) when it has a time.
_DATE_VALUE: Final = re.compile(
    r"(?P<y>[0-9]{4})(-(?P<m>[0-9]{2})(-(?P<d>[0-9]{2})"
    r"(T(?P<h>[0-9]{2}):(?P<mi>[0-9]{2})(:(?P<s>[0-9]{2})(?P<f>\.[0-9]{1,6})?)?(?P<z>Z|[+-][0-9]{2}:[0-9]{2}))?)?)?"
)


class SearchError(ValueError):
    """A search parameter this API cannot apply (400 ``bad_search``); the message says what it takes."""

    code = "bad_search"


def _range(value: str) -> tuple[datetime, datetime]:
    """The instants a FHIR date or dateTime covers, [start, end): a year, a month, a day, a minute,
    a second, or the fraction's precision."""
    match = _DATE_VALUE.fullmatch(value)
    if match is None:
        raise SearchError(
            f"date takes a FHIR date or dateTime (2026, 2026-11, 2026-11-23, 2026-11-23T08:00:00Z), "
            f"optionally after a prefix {', '.join(_PREFIXES)}"
        )
    y, m, d = int(match["y"]), int(match["m"] or 1), int(match["d"] or 1)
    try:
        if match["m"] is None:
            return datetime(y, 1, 1, tzinfo=UTC), datetime(y + 1, 1, 1, tzinfo=UTC)
        if match["d"] is None:
            start = datetime(y, m, 1, tzinfo=UTC)
            return start, datetime(y + m // 12, m % 12 + 1, 1, tzinfo=UTC)
        if match["h"] is None:
            start = datetime(y, m, d, tzinfo=UTC)
            return start, start + timedelta(days=1)
        zone = match["z"]
        text = value if zone != "Z" else value[:-1] + "+00:00"
        start = datetime.fromisoformat(text).astimezone(UTC)
        if match["s"] is None:
            step = timedelta(minutes=1)
        elif match["f"] is None:
            step = timedelta(seconds=1)
        else:
            step = timedelta(microseconds=10 ** (6 - (len(match["f"]) - 1)))
        return start, start + step
    except (ValueError, OverflowError):
        raise SearchError("date names no instant between the years 1 and 9999 in UTC") from None


def date_bounds(values: list[str]) -> tuple[datetime | None, datetime | None]:
    """Every ``date`` parameter at once (they are ANDed): the half-open [since, until) they leave."""
    since: datetime | None = None
    until: datetime | None = None
    for raw in values:
        prefix = raw[:2] if raw[:2] in _PREFIXES else "eq"
        start, end = _range(raw[2:] if raw[:2] in _PREFIXES else raw)
        low = {"eq": start, "ge": start, "gt": end}.get(prefix)
        high = {"eq": end, "le": end, "lt": start}.get(prefix)
        if low is not None:
            since = low if since is None else max(since, low)
        if high is not None:
            until = high if until is None else min(until, high)
    if since is not None and until is not None and since >= until:
        raise SearchError("the date parameters leave no time between them")
    return since, until


def _split(value: str, separator: str) -> list[str]:
    """``value`` split at each ``separator`` that no backslash escapes, each part unescaped (FHIR
    search values: ``\\,``, ``\\|``, ``\\$`` and ``\\\\`` stand for the character itself)."""
    parts, current, escaped = [], [], False
    for char in value:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise SearchError("a search value ends with a lone backslash: escape it as \\\\")
    parts.append("".join(current))
    return parts


def token(value: str, name: str, *systems: str) -> str:
    """The code of a token parameter, ``code`` or ``system|code`` with one of ``systems``."""
    given, bar, code = value.rpartition("|")
    if (bar and given not in systems) or not code:
        raise SearchError(f"{name} takes a code, or {' or '.join(s + '|<code>' for s in systems)}")
    return code


def identifier(value: str, name: str, systems: tuple[str, ...]) -> tuple[str, str]:
    """``system|value`` of an ``:identifier`` parameter, with one of ``systems``; the value unescaped
    (an OIDC subject may hold a comma, a bar or a backslash: ``\\,``, ``\\|``, ``\\\\``)."""
    system, bar, rest = value.partition("|")
    if not bar or system not in systems or not rest:
        raise SearchError(f"{name} takes {' or '.join(s + '|<value>' for s in systems)}")
    parts = _split(rest, "|")
    if len(parts) != 1 or not parts[0]:
        raise SearchError(f"{name} takes one value after its system: escape a bar in it as \\|")
    return system, parts[0]


#: Parameters that take one value: a repeat would be FHIR's AND of two values, which FastAPI would
#: silently read as the last one (an answer wider than asked).
SINGLE: Final = (
    "type",
    "subtype",
    "action",
    "outcome",
    "agent:identifier",
    "patient:identifier",
    "entity:identifier",
    "_count",
    "_sort",
    "cursor",
)


def check_values(pairs: list[tuple[str, str]]) -> None:
    """Refuse what the filters cannot mean: a one-value parameter given twice, and a comma (FHIR's OR
    of values, not supported) in a parameter other than ``date``."""
    names = [name for name, _ in pairs]
    for name in SINGLE:
        if names.count(name) > 1:
            raise SearchError(f"give {name} once: several values of one parameter are not supported")
    for name, value in pairs:
        if name in SINGLE and len(_split(value, ",")) > 1:
            raise SearchError(
                f"{name} takes one value: a comma (FHIR's 'or') is not supported, search once per value "
                "(a comma that is part of the value is escaped: \\,)"
            )


def search_filters(
    *,
    date: list[str] | None = None,
    type_: str | None = None,
    subtype: str | None = None,
    action: str | None = None,
    outcome: str | None = None,
    agent_identifier: str | None = None,
    patient_identifier: str | None = None,
    entity_identifier: str | None = None,
    order: Order = "asc",
) -> EventQuery:
    """The query of these search parameters, in ``order`` (the caller's tenant and cursor are set by
    the API), or :class:`SearchError`."""
    since, until = date_bounds(date or [])
    action_code = token(action, "action", ACTION_SYSTEM) if action is not None else None
    if action_code is not None and action_code not in {a.value for a in EventAction}:
        raise SearchError(f"action is one of {', '.join(a.value for a in EventAction)}")
    outcome_code = token(outcome, "outcome", OUTCOME_SYSTEM) if outcome is not None else None
    outcomes = {str(int(o)): int(o) for o in EventOutcome}
    if outcome_code is not None and outcome_code not in outcomes:
        raise SearchError(f"outcome is one of {', '.join(outcomes)}")
    patient = study = None
    if patient_identifier is not None:
        patient = identifier(patient_identifier, "patient:identifier", (PATIENT_SYSTEM,))[1]
    if entity_identifier is not None:
        system, value = identifier(entity_identifier, "entity:identifier", (PATIENT_SYSTEM, STUDY_SYSTEM))
        if system == STUDY_SYSTEM:
            study = value
        elif patient not in (None, value):
            raise SearchError("patient:identifier and entity:identifier name two patients")
        else:
            patient = value
    return EventQuery(
        order=order,
        since=since,
        until=until,
        event_code=token(type_, "type", DCM_SYSTEM, RFC_3881_SYSTEM) if type_ is not None else None,
        event_type_code=token(subtype, "subtype", DCM_SYSTEM, RFC_3881_SYSTEM)
        if subtype is not None
        else None,
        action=action_code,
        outcome=outcomes[outcome_code] if outcome_code is not None else None,
        actor=identifier(agent_identifier, "agent:identifier", (PRINCIPAL_SYSTEM,))[1]
        if agent_identifier is not None
        else None,
        patient=patient,
        study=study,
    )
