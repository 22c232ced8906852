"""Mapping of events to PS3.15 A.5-shaped audit records, and the PHI guard."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from enclave_audit import codes
from enclave_audit.codes import EventAction, EventOutcome, ObjectKind
from enclave_audit.records import AuditRecordDraft, parse_access_target, record_from_event


@pytest.mark.parametrize(
    ("topic", "code", "action", "outcome"),
    [
        ("enclave.upload.received.v1", codes.INSTANCES_TRANSFERRED, EventAction.CREATE, EventOutcome.SUCCESS),
        (
            "enclave.upload.rejected.v1",
            codes.INSTANCES_TRANSFERRED,
            EventAction.CREATE,
            EventOutcome.MINOR_FAILURE,
        ),
        ("enclave.instance.stored.v1", codes.INSTANCES_TRANSFERRED, EventAction.CREATE, EventOutcome.SUCCESS),
        (
            "enclave.instance.deidentified.v1",
            codes.INSTANCES_ACCESSED,
            EventAction.CREATE,
            EventOutcome.SUCCESS,
        ),
        (
            "enclave.instance.quarantined.v1",
            codes.INSTANCES_ACCESSED,
            EventAction.CREATE,
            EventOutcome.MINOR_FAILURE,
        ),
        (
            "enclave.analysis.completed.v1",
            codes.INSTANCES_ACCESSED,
            EventAction.EXECUTE,
            EventOutcome.SUCCESS,
        ),
        (
            "enclave.analysis.failed.v1",
            codes.INSTANCES_ACCESSED,
            EventAction.EXECUTE,
            EventOutcome.SERIOUS_FAILURE,
        ),
        ("enclave.key.rotated.v1", codes.SECURITY_ALERT, EventAction.UPDATE, EventOutcome.SUCCESS),
        ("enclave.key.shredded.v1", codes.STUDY_DELETED, EventAction.DELETE, EventOutcome.SUCCESS),
    ],
)
def test_service_events_map_to_dicom_event_ids(topic, code, action, outcome, make_envelope):
    event_type = topic.rsplit(".v", 1)[0]
    draft = record_from_event(make_envelope(event_type), topic)
    assert (draft.event_code, draft.action, draft.outcome) == (code, action, outcome)
    assert draft.event_type == event_type
    assert draft.topic == topic


def test_key_rotation_is_a_security_configuration_change(make_envelope):
    draft = record_from_event(
        make_envelope("enclave.key.rotated", data={"key_id": "kek-3"}), "enclave.key.rotated.v1"
    )
    assert draft.event_type_codes == (codes.SECURITY_CONFIGURATION,)
    assert draft.object_ids(ObjectKind.KEY) == ("kek-3",)


@pytest.mark.parametrize(
    ("action", "outcome", "code", "verb", "result", "types"),
    [
        ("retrieve", "success", codes.INSTANCES_ACCESSED, "R", 0, ()),
        ("query_studies", "success", codes.QUERY, "E", 0, ()),
        ("export", "success", codes.EXPORT, "R", 0, ()),
        ("login", "unauthenticated", codes.USER_AUTHENTICATION, "E", 4, (codes.LOGIN,)),
        ("retrieve", "unauthenticated", codes.USER_AUTHENTICATION, "E", 4, (codes.LOGIN,)),
        ("logout", "success", codes.USER_AUTHENTICATION, "E", 0, (codes.LOGOUT,)),
        ("break_glass", "success", codes.SECURITY_ALERT, "E", 0, (codes.EMERGENCY_OVERRIDE_STARTED,)),
        ("audit_query", "success", codes.AUDIT_LOG_USED, "R", 0, ()),
        # operator commands (enclave_common.operator_actions)
        ("dlq_replay", "success", codes.APPLICATION_ACTIVITY, "E", 0, ()),
        ("analysis_rerun", "error", codes.APPLICATION_ACTIVITY, "E", 8, ()),
        ("retrieve", "denied", codes.INSTANCES_ACCESSED, "R", 4, ()),
        ("retrieve", "error", codes.INSTANCES_ACCESSED, "R", 8, ()),
        ("retrieve", "something-new", codes.INSTANCES_ACCESSED, "R", 4, ()),
    ],
)
def test_access_events_are_coded_from_action_and_outcome(
    action, outcome, code, verb, result, types, make_access
):
    draft = record_from_event(make_access(action=action, outcome=outcome), "enclave.access.recorded.v1")
    assert draft.event_code == code
    assert draft.action == verb
    assert draft.outcome == result
    assert draft.event_type_codes == types


_CHANGED = (codes.USER_SECURITY_ATTRIBUTES_CHANGED,)


@pytest.mark.parametrize(
    ("action", "outcome", "code", "verb", "result", "types"),
    [
        # enclave_common.auth.Action values, as the gateway's and the audit API's guards emit them
        ("upload", "success", codes.INSTANCES_TRANSFERRED, "C", 0, ()),
        ("read_status", "success", codes.INSTANCES_ACCESSED, "R", 0, ()),
        ("read_results_phi", "success", codes.INSTANCES_ACCESSED, "R", 0, ()),
        ("read_results_deid", "success", codes.INSTANCES_ACCESSED, "R", 0, ()),
        ("read_linkage", "success", codes.INSTANCES_ACCESSED, "R", 0, ()),
        ("query_patient", "success", codes.QUERY, "E", 0, ()),
        ("audit_query", "denied", codes.AUDIT_LOG_USED, "R", 4, ()),
        ("audit_verify", "success", codes.AUDIT_LOG_USED, "R", 0, ()),
        ("audit_export", "success", codes.AUDIT_LOG_USED, "R", 0, ()),
        # POST /api/v1/grants 201, DELETE 200, their 409/422 refusals (before: 110103, R)
        ("manage_grants", "success", codes.SECURITY_ALERT, "U", 0, _CHANGED),
        ("manage_grants", "rejected", codes.SECURITY_ALERT, "U", 4, _CHANGED),
        ("manage_grants", "denied", codes.SECURITY_ALERT, "U", 4, _CHANGED),
        ("manage_grants", "unauthenticated", codes.USER_AUTHENTICATION, "E", 4, (codes.LOGIN,)),
        # GET /api/v1/grants/{id} and its refusals: a read, not a change (before: as manage_grants)
        ("read_grants", "success", codes.APPLICATION_ACTIVITY, "R", 0, ()),
        ("read_grants", "not_found", codes.APPLICATION_ACTIVITY, "R", 4, ()),
        ("break_glass", "rejected", codes.SECURITY_ALERT, "E", 4, ()),
        # A patient's restriction set or lifted (POST, DELETE /api/v1/restrictions), and the listing
        ("manage_restrictions", "success", codes.SECURITY_ALERT, "U", 0, _CHANGED),
        ("manage_restrictions", "rejected", codes.SECURITY_ALERT, "U", 4, _CHANGED),
        ("read_restrictions", "success", codes.APPLICATION_ACTIVITY, "R", 0, ()),
        # A patient key looked up: no patient data read, so not the patient query's 110112.
        ("query_patient_key", "success", codes.APPLICATION_ACTIVITY, "E", 0, ()),
        # A subject's tokens revoked: a change of its security attributes, as a grant's revocation.
        ("revoke_tokens", "success", codes.SECURITY_ALERT, "U", 0, _CHANGED),
        # deid's break-glass linkage read (enclave-deid-link)
        ("break_glass_linkage", "success", codes.SECURITY_ALERT, "E", 0, (codes.EMERGENCY_OVERRIDE_STARTED,)),
    ],
)
def test_the_action_strings_enclave_emits_are_coded_as_what_they_do(
    action, outcome, code, verb, result, types, make_access
):
    draft = record_from_event(make_access(action=action, outcome=outcome), "enclave.access.recorded.v1")
    assert (draft.event_code, draft.action, draft.outcome, draft.event_type_codes) == (
        code,
        verb,
        result,
        types,
    )


def test_access_event_keeps_actor_roles_and_source_address(make_access):
    draft = record_from_event(
        make_access(actor="dr-x", roles=["clinician", "researcher"], source_address="192.0.2.7"),
        "enclave.access.recorded.v1",
    )
    requestor = draft.participants[0]
    assert (requestor.user_id, requestor.roles, requestor.network_address) == (
        "dr-x",
        ("clinician", "researcher"),
        "192.0.2.7",
    )
    assert requestor.is_requestor
    assert draft.actor == "dr-x"
    gateway = draft.participants[1]
    assert gateway.user_id == "gateway"
    assert not gateway.is_requestor
    assert gateway.role_codes == (codes.ROLE_APPLICATION,)


def test_participant_objects_come_from_pseudonymous_keys(make_envelope):
    data = {
        "upload_id": "u-1",
        "patient_pseudonym": "pp-9",
        "study_key": "sk-1",
        "series_key": "se-1",
        "instance_key": "ik-1",
        "deid_study_uid": "2.25.1",
    }
    draft = record_from_event(
        make_envelope("enclave.instance.deidentified", data=data), "enclave.instance.deidentified.v1"
    )
    assert draft.object_ids(ObjectKind.PATIENT) == ("pp-9",)
    assert draft.object_ids(ObjectKind.STUDY) == ("sk-1",)
    assert draft.object_ids(ObjectKind.SERIES) == ("se-1",)
    assert draft.object_ids(ObjectKind.INSTANCE) == ("ik-1",)
    assert draft.object_ids(ObjectKind.UPLOAD) == ("u-1",)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/studies/sk1/series/se1", [(ObjectKind.STUDY, "sk1"), (ObjectKind.SERIES, "se1")]),
        ("study:sk2", [(ObjectKind.STUDY, "sk2")]),
        # what the gateway records for a read of an instance, and deid's break-glass linkage read
        ("patient:pk3/study:sk3", [(ObjectKind.PATIENT, "pk3"), (ObjectKind.STUDY, "sk3")]),
        ("patient_pseudonym:pp4", [(ObjectKind.PATIENT, "pp4")]),
        ("/uploads/u-7?x=1", [(ObjectKind.UPLOAD, "u-7")]),
        ("/audit/events", [(ObjectKind.AUDIT_LOG, "/audit/events")]),
        ("/health", [(ObjectKind.OTHER, "/health")]),
        # enclave-analysis-rerun's selection
        ("series:se5/reason_code:analysis_internal_error/status:failed", [(ObjectKind.SERIES, "se5")]),
    ],
)
def test_access_targets_are_parsed_without_their_query(target, expected):
    assert [(o.kind, o.object_id) for o in parse_access_target(target)] == expected


def test_phi_named_fields_are_stripped_and_listed_by_path_only(make_envelope):
    data = {
        "study_key": "sk-1",
        "PatientName": "Doe^Jane",
        "nested": {"patient_id": "MRN123", "birth_date": "19700101", "patient_key": "pk-1"},
        "items": [{"PatientBirthDate": "19700101"}],
    }
    draft = record_from_event(make_envelope(data=data), "enclave.instance.stored.v1")
    stored = draft.model_dump_json()
    for value in ("Doe^Jane", "MRN123", "19700101"):
        assert value not in stored
    assert set(draft.removed_fields) == {
        "data.PatientName",
        "data.nested.patient_id",
        "data.nested.birth_date",
        "data.items[0].PatientBirthDate",
    }
    assert draft.envelope["data"]["nested"]["patient_key"] == "pk-1"


def test_query_string_of_access_target_is_not_stored(make_access):
    draft = record_from_event(make_access(target="/studies?PatientName=Doe*"), "enclave.access.recorded.v1")
    assert "Doe" not in draft.model_dump_json()
    assert "data.target?query" in draft.removed_fields


def test_oversized_values_are_kept_as_digest_and_big_integers_as_strings(make_envelope):
    data = {"sealed": "A" * 5000, "counter": 2**60, "ratio": float("nan")}
    draft = record_from_event(make_envelope(data=data), "enclave.instance.stored.v1")
    kept = draft.envelope["data"]
    assert kept["sealed"]["omitted"] == "string"
    assert kept["sealed"]["length"] == 5000
    assert len(kept["sealed"]["sha256"]) == 64
    assert kept["counter"] == str(2**60)
    assert kept["ratio"] is None


def test_unknown_event_type_is_audited_as_application_activity(make_envelope):
    draft = record_from_event(
        make_envelope("enclave.widget.frobbed", data={"outcome": "error"}), "enclave.widget.frobbed.v1"
    )
    assert draft.event_code == codes.APPLICATION_ACTIVITY
    assert draft.action == EventAction.EXECUTE
    assert draft.outcome == EventOutcome.SERIOUS_FAILURE


def test_dead_lettered_event_is_a_serious_failure_of_its_topic(make_envelope):
    draft = record_from_event(make_envelope(), "enclave.instance.stored.v1.dlq")
    assert draft.dead_lettered
    assert draft.event_code == codes.APPLICATION_ACTIVITY
    assert draft.outcome == EventOutcome.SERIOUS_FAILURE
    assert draft.outcome_description == "dead-lettered from enclave.instance.stored.v1"
    assert draft.event_type == "enclave.instance.stored"


@pytest.mark.parametrize("rule", ["break_glass", "break_glass_opened"])  # audit and deid; the gateway
def test_break_glass_alert_is_an_emergency_override_with_severity_outcome(rule, make_envelope):
    data = {"rule": rule, "severity": "high", "subject": "dr-x", "detail": "justification given"}
    draft = record_from_event(
        make_envelope("enclave.security.alert", data=data, source="audit"), "enclave.security.alert.v1"
    )
    assert draft.event_code == codes.SECURITY_ALERT
    assert draft.event_type_codes == (codes.EMERGENCY_OVERRIDE_STARTED,)
    assert draft.outcome == EventOutcome.SERIOUS_FAILURE


def test_a_refused_break_glass_alert_overrode_nothing(make_envelope):
    data = {"rule": "break_glass_refused", "severity": "medium", "subject": "adm-x", "detail": "refused"}
    draft = record_from_event(
        make_envelope("enclave.security.alert", data=data, source="audit"), "enclave.security.alert.v1"
    )
    assert (draft.event_type_codes, draft.outcome) == ((), EventOutcome.MINOR_FAILURE)


def test_missing_id_is_derived_from_content_so_redelivery_is_idempotent(make_envelope):
    env = make_envelope()
    del env["id"]
    first = record_from_event(env, "enclave.instance.stored.v1")
    second = record_from_event(dict(env), "enclave.instance.stored.v1")
    other = record_from_event(make_envelope(n=5) | {"id": None}, "enclave.instance.stored.v1")
    assert first.event_id == second.event_id
    assert first.event_id != other.event_id


def test_times_are_utc_with_millisecond_precision_and_survive_a_naive_round_trip(make_envelope):
    env = make_envelope(time=datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    draft = record_from_event(
        env, "enclave.instance.stored.v1", received_at=datetime(2024, 1, 2, 3, 4, 6, tzinfo=UTC)
    )
    assert draft.event_time == datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    as_from_mongo = draft.model_dump() | {"event_time": draft.event_time.replace(tzinfo=None), "_id": "x"}
    assert AuditRecordDraft.model_validate(as_from_mongo) == draft


def test_missing_time_falls_back_to_receipt_time(make_envelope):
    env = make_envelope()
    del env["time"]
    received = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
    assert record_from_event(env, "enclave.instance.stored.v1", received_at=received).event_time == received
