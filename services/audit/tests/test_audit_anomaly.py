"""Anomaly rules at and past their thresholds; window state comes from the history, not memory."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import pytest
from enclave_audit.anomaly import (
    RULE_AUTH_FAILURES,
    RULE_BREAK_GLASS,
    RULE_BREAK_GLASS_REFUSED,
    RULE_LIFTED_THEN_READ,
    RULE_MANY_PATIENT_KEYS,
    RULE_MANY_STUDIES,
    RULE_OFF_HOURS,
    AnomalyDetector,
    AnomalyThresholds,
    InMemoryAuditHistory,
)
from enclave_audit.records import record_from_event

# Monday 2024-05-06 14:00 UTC
T0 = datetime(2024, 5, 6, 14, 0, tzinfo=UTC)


def feed(detector, history, envelopes):
    """Store then evaluate each event, as the service does; returns every alert raised."""
    raised = []
    for env in envelopes:
        record = record_from_event(env, "enclave.access.recorded.v1")
        history.add(record)
        alerts = detector.evaluate(record)
        for alert in alerts:
            history.record_alert(alert)
        raised.extend(alerts)
    return raised


@pytest.fixture
def history():
    return InMemoryAuditHistory()


def detector_with(history, **thresholds):
    return AnomalyDetector(AnomalyThresholds(**thresholds), history)


def test_many_studies_alerts_at_the_limit_not_below(history, make_access):
    detector = detector_with(history, distinct_studies_limit=5, distinct_studies_window=timedelta(minutes=10))
    below = [make_access(n, target=f"/studies/s{n}", time=T0 + timedelta(seconds=n)) for n in range(4)]
    assert [a for a in feed(detector, history, below) if a.rule == RULE_MANY_STUDIES] == []
    at = feed(detector, history, [make_access(4, target="/studies/s4", time=T0 + timedelta(seconds=4))])
    assert [(a.rule, a.count, a.threshold, a.subject) for a in at] == [(RULE_MANY_STUDIES, 5, 5, "dr-who")]
    # Past the limit inside the same window: no second alert for the same actor.
    past = [make_access(n, target=f"/studies/s{n}", time=T0 + timedelta(seconds=n)) for n in range(5, 9)]
    assert feed(detector, history, past) == []


def test_repeated_access_to_the_same_study_is_not_many_studies(history, make_access):
    detector = detector_with(history, distinct_studies_limit=3)
    same = [make_access(n, target="/studies/s1", time=T0 + timedelta(seconds=n)) for n in range(10)]
    assert feed(detector, history, same) == []


def test_studies_outside_the_window_do_not_count(history, make_access):
    detector = detector_with(history, distinct_studies_limit=3, distinct_studies_window=timedelta(minutes=1))
    spread = [make_access(n, target=f"/studies/s{n}", time=T0 + timedelta(minutes=2 * n)) for n in range(6)]
    assert feed(detector, history, spread) == []


def test_window_state_survives_a_restart(history, make_access):
    first = detector_with(history, distinct_studies_limit=4)
    feed(
        first,
        history,
        [make_access(n, target=f"/studies/s{n}", time=T0 + timedelta(seconds=n)) for n in range(3)],
    )
    restarted = detector_with(history, distinct_studies_limit=4)  # new process, same store
    alerts = feed(restarted, history, [make_access(3, target="/studies/s3", time=T0 + timedelta(seconds=3))])
    assert [a.rule for a in alerts] == [RULE_MANY_STUDIES]


def test_auth_failures_alert_per_actor_and_per_source(history, make_access):
    detector = detector_with(history, auth_failure_limit=3, auth_failure_window=timedelta(minutes=5))
    fails = [
        make_access(n, action="login", outcome="unauthenticated", target=None, time=T0 + timedelta(seconds=n))
        for n in range(2)
    ]
    assert feed(detector, history, fails) == []
    third = make_access(
        2, action="login", outcome="unauthenticated", target=None, time=T0 + timedelta(seconds=2)
    )
    alerts = feed(detector, history, [third])
    assert sorted(a.subject for a in alerts) == ["actor:dr-who", "source:10.1.2.3"]
    assert {a.rule for a in alerts} == {RULE_AUTH_FAILURES}
    assert all(a.count == 3 and a.severity == "high" for a in alerts)


def test_password_spraying_from_one_source_is_caught(history, make_access):
    detector = detector_with(history, auth_failure_limit=4)
    sprays = [
        make_access(n, actor=f"user-{n}", action="login", outcome="unauthenticated", target=None,
                    time=T0 + timedelta(seconds=n))
        for n in range(4)
    ]  # fmt: skip
    alerts = feed(detector, history, sprays)
    assert [a.subject for a in alerts] == ["source:10.1.2.3"]


def test_successful_logins_do_not_count(history, make_access):
    detector = detector_with(history, auth_failure_limit=2)
    ok = [make_access(n, action="login", outcome="success", target=None, time=T0) for n in range(5)]
    assert feed(detector, history, ok) == []


def test_break_glass_always_alerts(history, make_access):
    detector = detector_with(history)
    alerts = feed(detector, history, [make_access(0, action="break_glass", time=T0)])
    assert [(a.rule, a.severity, a.subject) for a in alerts] == [(RULE_BREAK_GLASS, "high", "dr-who")]
    assert alerts[0].to_event_data()["rule"] == "break_glass"


@pytest.mark.parametrize("outcome", ["denied", "rejected", "error"])
def test_a_refused_break_glass_attempt_is_reported_as_refused_not_as_used(history, make_access, outcome):
    detector = detector_with(history)
    attempt = make_access(0, action="break_glass", outcome=outcome, time=T0)
    alerts = feed(detector, history, [attempt])
    assert [(a.rule, a.severity, a.subject, a.detail) for a in alerts] == [
        (RULE_BREAK_GLASS_REFUSED, "medium", "dr-who", "break-glass attempt refused")
    ]


def test_a_refused_ordinary_access_is_not_a_break_glass_attempt(history, make_access):
    detector = detector_with(history)
    assert feed(detector, history, [make_access(0, action="retrieve", outcome="denied", time=T0)]) == []


@pytest.mark.parametrize(
    ("moment", "inside"),
    [
        (datetime(2024, 5, 6, 11, 0, tzinfo=UTC), True),  # Monday 07:00 in New York (EDT, UTC-4)
        (datetime(2024, 5, 6, 10, 59, tzinfo=UTC), False),  # Monday 06:59 New York
        (datetime(2024, 5, 6, 22, 59, tzinfo=UTC), True),  # 18:59
        (datetime(2024, 5, 6, 23, 0, tzinfo=UTC), False),  # 19:00, end is exclusive
        (datetime(2024, 5, 11, 15, 0, tzinfo=UTC), False),  # Saturday 11:00
        (datetime(2024, 1, 8, 12, 0, tzinfo=UTC), True),  # Monday 07:00 EST (UTC-5), winter
        (datetime(2024, 1, 8, 11, 59, tzinfo=UTC), False),
    ],
)
def test_business_hours_are_timezone_aware(history, moment, inside):
    detector = detector_with(history, timezone="America/New_York")
    assert detector.within_business_hours(moment) is inside


def test_night_shift_hours_span_midnight(history):
    detector = detector_with(history, business_hours_start=time(22), business_hours_end=time(6))
    monday_night = datetime(2024, 5, 6, 23, 0, tzinfo=UTC)
    assert detector.within_business_hours(monday_night)
    assert detector.within_business_hours(datetime(2024, 5, 7, 5, 59, tzinfo=UTC))  # the Monday shift
    assert not detector.within_business_hours(datetime(2024, 5, 7, 6, 0, tzinfo=UTC))
    assert detector.within_business_hours(datetime(2024, 5, 11, 1, 0, tzinfo=UTC))  # Friday's shift
    assert not detector.within_business_hours(datetime(2024, 5, 11, 23, 0, tzinfo=UTC))  # Saturday
    assert not detector.within_business_hours(datetime(2024, 5, 12, 1, 0, tzinfo=UTC))  # Saturday's shift


def test_off_hours_access_alerts_once_per_realert_period(history, make_access):
    detector = detector_with(history, timezone="Europe/Paris", off_hours_realert_after=timedelta(hours=1))
    night = datetime(2024, 5, 6, 1, 0, tzinfo=UTC)  # 03:00 in Paris
    alerts = feed(
        detector,
        history,
        [make_access(n, target=f"/studies/s{n}", time=night + timedelta(minutes=10 * n)) for n in range(8)],
    )
    offs = [a for a in alerts if a.rule == RULE_OFF_HOURS]
    assert [a.window_end for a in offs] == [night, night + timedelta(minutes=70)]


def test_service_accounts_are_exempt_from_hours_rule(history, make_access):
    detector = detector_with(history)
    night = datetime(2024, 5, 6, 2, 0, tzinfo=UTC)
    assert feed(detector, history, [make_access(0, roles=["uploader"], time=night)]) == []


def test_security_alert_records_are_never_re_alerted(history, make_envelope):
    detector = detector_with(history)
    data = {"rule": "break_glass", "severity": "high", "subject": "dr-who", "detail": "x"}
    record = record_from_event(
        make_envelope("enclave.security.alert", data=data), "enclave.security.alert.v1"
    )
    assert detector.evaluate(record) == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("timezone", "Mars/Olympus", "unknown"),
        ("business_days", frozenset({7}), "weekday"),
        ("auth_failure_window", timedelta(0), "positive"),
        ("distinct_studies_limit", 0, "greater than or equal to 1"),
    ],
)
def test_thresholds_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        AnomalyThresholds(**{field: value})


# ---- restriction_lifted_then_read ---------------------------------------------------------------

KEY = "k" * 32


def _lifting(make_access, n, *, actor="adm-1", at=T0, outcome="success", patient=KEY, detail=None):
    env = make_access(n, actor=actor, action="manage_restrictions", target=f"patient:{patient}", time=at,
                      outcome=outcome, roles=["admin"])  # fmt: skip
    env["data"]["detail"] = detail or (
        "restriction_lifted restricted_by=adm-0 restricted_at=2024-05-01T00:00:00+00:00"
        if outcome == "success"
        else "separation_of_duties"
    )
    return env


def _phi_read(make_access, n, *, actor="adm-1", at, action="read_results_phi", patient=KEY, basis="role"):
    env = make_access(n, actor=actor, action=action, target=f"patient:{patient}/study:s1", time=at)
    env["data"]["detail"] = basis
    return env


def test_a_phi_read_by_the_actor_that_lifted_the_restriction_alerts_once(history, make_access):
    """The gateway refuses a lifting to a token that is also a clinician's; the same person holding a
    second token (same sub, admin only) would pass: the trail catches the read that follows."""
    detector = detector_with(history)
    events = [
        _lifting(make_access, 1, at=T0),
        _phi_read(make_access, 2, at=T0 + timedelta(hours=2)),
        _phi_read(make_access, 3, at=T0 + timedelta(hours=3), action="query_patient"),
    ]
    alerts = [a for a in feed(detector, history, events) if a.rule == RULE_LIFTED_THEN_READ]
    assert [(a.severity, a.subject, a.triggering_event_id) for a in alerts] == [
        ("high", f"adm-1 patient:{KEY}", events[1]["id"])
    ]
    assert KEY in alerts[0].detail and "read_results_phi" in alerts[0].detail
    assert alerts[0].window_start == T0
    # Lifted again later: a read after that lifting alerts again.
    again = [
        _lifting(make_access, 4, at=T0 + timedelta(hours=5)),
        _phi_read(make_access, 5, at=T0 + timedelta(hours=6)),
    ]
    assert [a.rule for a in feed(detector, history, again) if a.rule == RULE_LIFTED_THEN_READ] == [
        RULE_LIFTED_THEN_READ
    ]


@pytest.mark.parametrize(
    "case",
    [
        "another_actor",
        "another_patient",
        "outside_window",
        "refused_lifting",
        "not_phi",
        "read_before",
        "under_a_grant",
        "under_break_glass",
        "lifting_not_made",
    ],
)
def test_what_is_not_a_lifted_then_read(history, make_access, case):
    detector = detector_with(history, restriction_lift_window=timedelta(hours=24))
    lifting = _lifting(make_access, 1, at=T0, outcome="denied" if case == "refused_lifting" else "success")
    if case == "lifting_not_made":  # recorded first, then restricted again meanwhile: 409, second event
        feed(detector, history, [lifting])
        lifting = _lifting(make_access, 9, at=T0 + timedelta(seconds=1), outcome="rejected",
                           detail="restriction_not_lifted restricted_by=adm-0 cause=restricted_again")  # fmt: skip
    read = {
        "another_actor": _phi_read(make_access, 2, actor="dr-2", at=T0 + timedelta(hours=1)),
        "another_patient": _phi_read(make_access, 2, patient="p" * 32, at=T0 + timedelta(hours=1)),
        "outside_window": _phi_read(make_access, 2, at=T0 + timedelta(hours=24, seconds=1)),
        "refused_lifting": _phi_read(make_access, 2, at=T0 + timedelta(hours=1)),
        "not_phi": _phi_read(make_access, 2, at=T0 + timedelta(hours=1), action="read_status"),
        "read_before": _phi_read(make_access, 2, at=T0 - timedelta(hours=1)),
        "under_a_grant": _phi_read(make_access, 2, at=T0 + timedelta(hours=1), basis="grant"),
        "under_break_glass": _phi_read(make_access, 2, at=T0 + timedelta(hours=1), basis="break_glass"),
        "lifting_not_made": _phi_read(make_access, 2, at=T0 + timedelta(hours=1)),
    }[case]
    raised = feed(detector, history, [lifting, read])
    assert [a for a in raised if a.rule == RULE_LIFTED_THEN_READ] == []


# ---- many_patient_keys ----------------------------------------------------------------------------


def _key_lookup(make_access, n, *, actor="aud-1", at, patient):
    env = make_access(n, actor=actor, action="query_patient_key", target=f"patient:{patient}", time=at,
                      roles=["auditor"])  # fmt: skip
    env["data"]["detail"] = "role"
    return env


def test_many_patient_key_lookups_alert_at_the_limit_once(history, make_access):
    """An auditor who turns guessed patient ids into keys and queries the trail learns who is a patient:
    lookups of many distinct patients by one actor within a day raise ``many_patient_keys``."""
    detector = detector_with(history, patient_key_lookup_limit=3)
    same = [_key_lookup(make_access, n, at=T0 + timedelta(minutes=n), patient="a" * 32) for n in range(5)]
    assert [a for a in feed(detector, history, same) if a.rule == RULE_MANY_PATIENT_KEYS] == []  # one patient
    more = [
        _key_lookup(make_access, 10 + n, at=T0 + timedelta(hours=n), patient=chr(98 + n) * 32)
        for n in range(3)
    ]
    alerts = [a for a in feed(detector, history, more) if a.rule == RULE_MANY_PATIENT_KEYS]
    assert [(a.severity, a.subject, a.count) for a in alerts] == [("high", "aud-1 tenant:hospital-a", 3)]
    later = [_key_lookup(make_access, 20, at=T0 + timedelta(hours=3), patient="z" * 32)]
    assert [a for a in feed(detector, history, later) if a.rule == RULE_MANY_PATIENT_KEYS] == []  # not again


def test_patient_key_lookups_outside_the_window_or_by_others_do_not_count(history, make_access):
    detector = detector_with(
        history, patient_key_lookup_limit=2, patient_key_lookup_window=timedelta(hours=1)
    )
    events = [
        _key_lookup(make_access, 1, at=T0, patient="a" * 32),
        _key_lookup(make_access, 2, at=T0 + timedelta(hours=2), patient="b" * 32),
        _key_lookup(make_access, 3, actor="aud-2", at=T0 + timedelta(hours=2), patient="c" * 32),
    ]
    assert [a for a in feed(detector, history, events) if a.rule == RULE_MANY_PATIENT_KEYS] == []
