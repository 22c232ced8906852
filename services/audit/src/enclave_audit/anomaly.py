"""Anomaly rules over the audit trail that raise security alerts.

Rules: many distinct studies accessed by one actor within a sliding window; repeated failed
authentications per actor and per source address; any break-glass use; access outside configured
business hours (in the configured time zone); a PHI read of a patient by the actor that lifted its
restriction shortly before. Window state is not kept in this process: rules ask
an :class:`AuditHistory` (the audit store, queried after the record was inserted), so a restart
loses nothing, and an alert is not repeated while one for the same rule and subject is recent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, time, timedelta
from typing import Final, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from enclave_common import topics
from enclave_common.auth import Action
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from enclave_audit import codes
from enclave_audit.codes import EventOutcome, ObjectKind
from enclave_audit.records import AuditRecordDraft, is_break_glass_action

RULE_MANY_STUDIES: Final = "many_studies_accessed"
RULE_AUTH_FAILURES: Final = "repeated_authentication_failures"
RULE_BREAK_GLASS: Final = "break_glass"
RULE_BREAK_GLASS_REFUSED: Final = "break_glass_refused"
RULE_OFF_HOURS: Final = "access_outside_hours"
RULE_LIFTED_THEN_READ: Final = "restriction_lifted_then_read"
RULE_MANY_PATIENT_KEYS: Final = "many_patient_keys"

#: The gateway's reads of a patient's PHI that a role allows (``read_linkage`` is break-glass only,
#: and deid records it as ``break_glass_linkage``).
PHI_READ_ACTIONS: Final = frozenset({Action.READ_RESULTS_PHI.value, Action.QUERY_PATIENT.value})


def _detail_word(record: AuditRecordDraft, action: str) -> str | None:
    """The first word of an access record's ``detail`` when its action is ``action``."""
    data = record.envelope.get("data") or {}
    if record.event_type != _ACCESS_TYPE or data.get("action") != action:
        return None
    return str(data.get("detail") or "").split(" ", 1)[0]


def restriction_lifted(record: AuditRecordDraft) -> bool:
    """Whether ``record`` records a restriction's lifting (the gateway's ``manage_restrictions``
    answered 200, ``restriction_lifted ...``). The gateway records a lifting before it makes it: one
    then not made is followed by :func:`lifting_undone`."""
    return (
        record.outcome == EventOutcome.SUCCESS
        and _detail_word(record, Action.MANAGE_RESTRICTIONS.value) == "restriction_lifted"
    )


def lifting_undone(record: AuditRecordDraft) -> bool:
    """Whether ``record`` says a lifting recorded just before was not made (``restriction_not_lifted``)."""
    return _detail_word(record, Action.MANAGE_RESTRICTIONS.value) == "restriction_not_lifted"


def patient_key_lookup(record: AuditRecordDraft) -> bool:
    """Whether ``record`` is an answered ``query_patient_key`` (a patient id turned into its key)."""
    return (
        record.outcome == EventOutcome.SUCCESS
        and _detail_word(record, Action.QUERY_PATIENT_KEY.value) is not None
    )


_ACCESS_TYPE: Final = topics.event_type(topics.ACCESS_RECORDED)
_ALERT_TYPE: Final = topics.event_type(topics.SECURITY_ALERT)

Severity = Literal["low", "medium", "high", "critical"]


class AnomalyThresholds(BaseModel):
    """Rule thresholds (configurable per deployment)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    distinct_studies_limit: int = Field(default=20, ge=1)
    distinct_studies_window: timedelta = timedelta(minutes=10)
    auth_failure_limit: int = Field(default=5, ge=1)
    auth_failure_window: timedelta = timedelta(minutes=5)
    business_hours_start: time = time(7, 0)
    business_hours_end: time = time(19, 0)
    business_days: frozenset[int] = frozenset({0, 1, 2, 3, 4})
    timezone: str = "UTC"
    off_hours_realert_after: timedelta = timedelta(hours=1)
    #: Principals whose roles are all in this set (service accounts) are not subject to the hours rule.
    off_hours_exempt_roles: frozenset[str] = frozenset({"uploader", "service"})
    #: How long after lifting a patient's restriction a PHI read of that patient by the same actor
    #: raises ``restriction_lifted_then_read``.
    restriction_lift_window: timedelta = timedelta(hours=24)
    #: Distinct patient keys one actor may look up (``query_patient_key``) within the window before
    #: ``many_patient_keys``: guessing patient ids and querying the trail would tell who is a patient.
    patient_key_lookup_limit: int = Field(default=20, ge=1)
    patient_key_lookup_window: timedelta = timedelta(hours=24)

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"time zone {value!r} is unknown; use an IANA name such as Europe/Paris"
            ) from exc
        return value

    @field_validator("business_days")
    @classmethod
    def _weekdays(cls, value: frozenset[int]) -> frozenset[int]:
        if not value <= set(range(7)):
            raise ValueError("business_days are weekday numbers 0 (Monday) to 6 (Sunday)")
        return value

    @model_validator(mode="after")
    def _positive_windows(self) -> AnomalyThresholds:
        for name in (
            "distinct_studies_window",
            "auth_failure_window",
            "off_hours_realert_after",
            "restriction_lift_window",
            "patient_key_lookup_window",
        ):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be a positive duration")
        return self


class AlertDraft(BaseModel):
    """A security alert to publish on ``security.alert`` (no PHI: ids, counts and rule names only)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rule: str
    severity: Severity
    subject: str
    tenant: str | None
    detail: str
    count: int
    threshold: int
    window_start: datetime
    window_end: datetime
    triggering_event_id: str

    def to_event_data(self) -> dict[str, object]:
        """The ``security.alert`` payload (``SecurityAlert`` in enclave_common.events)."""
        return {"rule": self.rule, "severity": self.severity, "subject": self.subject, "detail": self.detail}


class AuditHistory(Protocol):
    """What the rules need to know about the past; the audit store answers it with indexed queries.

    Counts include the record being evaluated (it is stored before the rules run).
    """

    def count_distinct_studies(
        self, *, actor: str, tenant: str | None, since: datetime, until: datetime
    ) -> int:
        """Distinct study keys in successful access records by ``actor`` with event time in the window."""
        ...

    def count_authentication_failures(
        self, *, actor: str | None, source_address: str | None, since: datetime, until: datetime
    ) -> int:
        """Failed User Authentication records for the actor (or, if given, the source address)."""
        ...

    def last_alert_time(self, *, rule: str, subject: str) -> datetime | None:
        """Event time of the most recent alert raised for ``rule`` and ``subject``, if any."""
        ...

    def last_restriction_lift(self, *, actor: str, tenant: str | None, patient_key: str) -> datetime | None:
        """Event time of the latest restriction on ``patient_key`` that ``actor`` lifted and that was not
        undone after (:func:`lifting_undone`), if any."""
        ...

    def count_patient_key_lookups(
        self, *, actor: str, tenant: str | None, since: datetime, until: datetime
    ) -> int:
        """Distinct patient keys ``actor`` looked up (:func:`patient_key_lookup`) in the window."""
        ...


class AnomalyDetector:
    """Evaluates the rules for one newly stored record."""

    def __init__(self, thresholds: AnomalyThresholds, history: AuditHistory) -> None:
        self.thresholds = thresholds
        self.history = history
        self._zone = ZoneInfo(thresholds.timezone)

    def evaluate(self, record: AuditRecordDraft) -> list[AlertDraft]:
        if record.event_type == _ALERT_TYPE:
            return []  # alerts are audited, never re-alerted
        alerts: list[AlertDraft] = []
        if codes.EMERGENCY_OVERRIDE_STARTED in record.event_type_codes:
            alerts.append(self._alert(record, RULE_BREAK_GLASS, "high", record.actor, 1, 1, timedelta(0)))
        elif (
            record.event_type == _ACCESS_TYPE
            and record.outcome is not EventOutcome.SUCCESS
            and is_break_glass_action((record.envelope.get("data") or {}).get("action"))
        ):
            alerts.append(
                self._alert(record, RULE_BREAK_GLASS_REFUSED, "medium", record.actor, 1, 1, timedelta(0))
            )
        if record.event_code == codes.USER_AUTHENTICATION and record.outcome != EventOutcome.SUCCESS:
            alerts.extend(self._auth_failures(record))
        if record.event_type == _ACCESS_TYPE:
            alerts.extend(self._many_studies(record))
            alerts.extend(self._off_hours(record))
            alerts.extend(self._lifted_then_read(record))
            alerts.extend(self._many_patient_keys(record))
        return alerts

    def _many_patient_keys(self, record: AuditRecordDraft) -> Iterable[AlertDraft]:
        t = self.thresholds
        if not patient_key_lookup(record):
            return
        since = record.event_time - t.patient_key_lookup_window
        count = self.history.count_patient_key_lookups(
            actor=record.actor, tenant=record.tenant, since=since, until=record.event_time
        )
        # Per tenant: one subject name may exist in two tenants (each its own identity provider), and an
        # alert in one must not hold back the other's.
        subject = f"{record.actor} tenant:{record.tenant}"
        if count >= t.patient_key_lookup_limit and self._not_recent(RULE_MANY_PATIENT_KEYS, subject, since):
            yield self._alert(
                record, RULE_MANY_PATIENT_KEYS, "high", subject, count, t.patient_key_lookup_limit,
                t.patient_key_lookup_window,
            )  # fmt: skip

    def _lifted_then_read(self, record: AuditRecordDraft) -> Iterable[AlertDraft]:
        """A PHI read of a patient by the actor that lifted its restriction within the window: the
        gateway refuses a lifting to a token that also holds a held-back role (separation of duties),
        but one person holding two tokens with the same subject would pass that check."""
        data = record.envelope.get("data") or {}
        if (
            record.outcome != EventOutcome.SUCCESS
            or data.get("action") not in PHI_READ_ACTIONS
            or data.get("detail") != "role"  # a grant applies restricted or not; break-glass alerts anyway
        ):
            return
        window = self.thresholds.restriction_lift_window
        for key in record.object_ids(ObjectKind.PATIENT):
            lifted = self.history.last_restriction_lift(
                actor=record.actor, tenant=record.tenant, patient_key=key
            )
            if lifted is None or not record.event_time - window <= lifted <= record.event_time:
                continue
            subject = f"{record.actor} patient:{key}"
            if self._not_recent(RULE_LIFTED_THEN_READ, subject, lifted):
                alert = self._alert(
                    record, RULE_LIFTED_THEN_READ, "high", subject, 1, 1, record.event_time - lifted
                )
                yield alert.model_copy(
                    update={
                        "detail": f"{data.get('action')} of patient {key} by the actor that lifted its "
                        f"restriction at {lifted.isoformat()}"
                    }
                )

    def _many_studies(self, record: AuditRecordDraft) -> Iterable[AlertDraft]:
        t = self.thresholds
        if record.outcome != EventOutcome.SUCCESS or not record.object_ids(ObjectKind.STUDY):
            return
        since = record.event_time - t.distinct_studies_window
        count = self.history.count_distinct_studies(
            actor=record.actor, tenant=record.tenant, since=since, until=record.event_time
        )
        if count >= t.distinct_studies_limit and self._not_recent(RULE_MANY_STUDIES, record.actor, since):
            severity: Severity = "high" if count >= 2 * t.distinct_studies_limit else "medium"
            yield self._alert(
                record, RULE_MANY_STUDIES, severity, record.actor, count, t.distinct_studies_limit,
                t.distinct_studies_window,
            )  # fmt: skip

    def _auth_failures(self, record: AuditRecordDraft) -> Iterable[AlertDraft]:
        t = self.thresholds
        since = record.event_time - t.auth_failure_window
        address = record.participants[0].network_address if record.participants else None
        subjects: list[tuple[str, str | None, str | None]] = [(f"actor:{record.actor}", record.actor, None)]
        if address:
            subjects.append((f"source:{address}", None, address))
        for subject, actor, source_address in subjects:
            count = self.history.count_authentication_failures(
                actor=actor, source_address=source_address, since=since, until=record.event_time
            )
            if count >= t.auth_failure_limit and self._not_recent(RULE_AUTH_FAILURES, subject, since):
                yield self._alert(
                    record,
                    RULE_AUTH_FAILURES,
                    "high",
                    subject,
                    count,
                    t.auth_failure_limit,
                    t.auth_failure_window,
                )

    def _off_hours(self, record: AuditRecordDraft) -> Iterable[AlertDraft]:
        t = self.thresholds
        roles = set(record.participants[0].roles) if record.participants else set()
        if not roles or roles <= t.off_hours_exempt_roles or self.within_business_hours(record.event_time):
            return
        if self._not_recent(RULE_OFF_HOURS, record.actor, record.event_time - t.off_hours_realert_after):
            yield self._alert(record, RULE_OFF_HOURS, "low", record.actor, 1, 1, timedelta(0))

    def within_business_hours(self, moment: datetime) -> bool:
        """Whether ``moment`` falls in business hours on a business day, in the configured zone."""
        t = self.thresholds
        local = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(self._zone)
        clock = local.time().replace(tzinfo=None)
        start, end = t.business_hours_start, t.business_hours_end
        if start <= end:
            return local.weekday() in t.business_days and start <= clock < end
        # A night shift (e.g. 22:00-06:00) belongs to the day it started on.
        if clock >= start:
            return local.weekday() in t.business_days
        return clock < end and (local - timedelta(days=1)).weekday() in t.business_days

    def _not_recent(self, rule: str, subject: str, since: datetime) -> bool:
        last = self.history.last_alert_time(rule=rule, subject=subject)
        return last is None or last < since

    def _alert(
        self,
        record: AuditRecordDraft,
        rule: str,
        severity: Severity,
        subject: str,
        count: int,
        threshold: int,
        window: timedelta,
    ) -> AlertDraft:
        detail = {
            RULE_BREAK_GLASS: "break-glass access used",
            RULE_BREAK_GLASS_REFUSED: "break-glass attempt refused",
            RULE_MANY_STUDIES: f"{count} distinct studies accessed within {window}",
            RULE_AUTH_FAILURES: f"{count} failed authentications within {window}",
            RULE_OFF_HOURS: f"access outside business hours ({self.thresholds.timezone})",
            RULE_LIFTED_THEN_READ: "PHI read by the actor that lifted the patient's restriction",
            RULE_MANY_PATIENT_KEYS: f"{count} distinct patient keys looked up within {window}",
        }[rule]
        return AlertDraft(
            rule=rule,
            severity=severity,
            subject=subject,
            tenant=record.tenant,
            detail=detail,
            count=count,
            threshold=threshold,
            window_start=record.event_time - window,
            window_end=record.event_time,
            triggering_event_id=record.event_id,
        )


class InMemoryAuditHistory:
    """An :class:`AuditHistory` over records held in a list: for tests and as the reference semantics."""

    def __init__(self) -> None:
        self.records: list[AuditRecordDraft] = []
        self.alerts: list[tuple[str, str, datetime]] = []

    def add(self, record: AuditRecordDraft) -> None:
        self.records.append(record)

    def record_alert(self, alert: AlertDraft) -> None:
        self.alerts.append((alert.rule, alert.subject, alert.window_end))

    def count_distinct_studies(
        self, *, actor: str, tenant: str | None, since: datetime, until: datetime
    ) -> int:
        return len(
            {
                study
                for r in self.records
                if r.event_type == _ACCESS_TYPE
                and r.actor == actor
                and r.tenant == tenant
                and r.outcome == EventOutcome.SUCCESS
                and since <= r.event_time <= until
                for study in r.object_ids(ObjectKind.STUDY)
            }
        )

    def count_authentication_failures(
        self, *, actor: str | None, source_address: str | None, since: datetime, until: datetime
    ) -> int:
        def matches(r: AuditRecordDraft) -> bool:
            if source_address is not None:
                return bool(r.participants) and r.participants[0].network_address == source_address
            return r.actor == actor

        return sum(
            1
            for r in self.records
            if r.event_code == codes.USER_AUTHENTICATION
            and r.outcome != EventOutcome.SUCCESS
            and since <= r.event_time <= until
            and matches(r)
        )

    def last_alert_time(self, *, rule: str, subject: str) -> datetime | None:
        times = [at for r, s, at in self.alerts if r == rule and s == subject]
        return max(times) if times else None

    def last_restriction_lift(self, *, actor: str, tenant: str | None, patient_key: str) -> datetime | None:
        def times(of: Callable[[AuditRecordDraft], bool]) -> list[datetime]:
            return [
                r.event_time
                for r in self.records
                if r.actor == actor
                and r.tenant == tenant
                and of(r)
                and patient_key in r.object_ids(ObjectKind.PATIENT)
            ]

        lifted, undone = (
            max(times(restriction_lifted), default=None),
            max(times(lifting_undone), default=None),
        )
        return lifted if lifted is not None and (undone is None or undone < lifted) else None

    def count_patient_key_lookups(
        self, *, actor: str, tenant: str | None, since: datetime, until: datetime
    ) -> int:
        return len(
            {
                key
                for r in self.records
                if r.actor == actor
                and r.tenant == tenant
                and patient_key_lookup(r)
                and since <= r.event_time <= until
                for key in r.object_ids(ObjectKind.PATIENT)
            }
        )
