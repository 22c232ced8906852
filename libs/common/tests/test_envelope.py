from __future__ import annotations

import uuid

import pytest
from enclave_common import topics
from enclave_common.envelope import Envelope, derived_event_id, new_event_id
from enclave_common.events import UploadChunk, UploadReceived
from pydantic import ValidationError


def _chunk() -> UploadChunk:
    return UploadChunk(
        upload_id="u1",
        instance_upload_id="i1",
        index=0,
        count=2,
        sealed=bytes(range(256)),
        total_size=300,
        sha256="ab" * 32,
    )


def test_event_ids_are_uuid7_and_time_ordered():
    ids = [new_event_id() for _ in range(50)]
    assert all(uuid.UUID(i).version == 7 for i in ids)
    assert ids == sorted(ids)


def test_envelope_round_trip_keeps_binary_payload():
    env = Envelope.for_topic(
        topics.UPLOAD_CHUNK, _chunk(), source="gateway", tenant="t1", actor="svc", correlation_id="u1"
    )
    back = Envelope.from_bytes(env.to_bytes())
    assert back == env
    assert back.type == "enclave.upload.chunk"
    assert back.payload(UploadChunk).sealed == bytes(range(256))


def test_envelope_is_frozen_and_tolerates_unknown_fields():
    env = Envelope.for_topic(
        topics.UPLOAD_CHUNK, _chunk(), source="gateway", tenant="t1", actor="svc", correlation_id="u1"
    )
    with pytest.raises(ValidationError):
        env.tenant = "other"  # type: ignore[misc]
    raw = env.model_dump(mode="json") | {"added_by_a_newer_producer": 1}
    assert Envelope.model_validate(raw).id == env.id


def test_payload_validation_rejects_a_wrong_shape():
    env = Envelope(type="x", source="s", tenant="t", actor="a", correlation_id="c", data={"upload_id": 1})
    with pytest.raises(ValidationError):
        env.payload(UploadReceived)


def test_derived_ids_repeat_for_the_same_cause_and_differ_otherwise():
    cause = new_event_id()
    a = derived_event_id(cause, "enclave.instance.stored", "i1")
    assert a == derived_event_id(cause, "enclave.instance.stored", "i1")
    assert a != derived_event_id(cause, "enclave.instance.stored", "i2")
    assert a != derived_event_id(new_event_id(), "enclave.instance.stored", "i1")
    parsed = uuid.UUID(a)
    assert parsed.version == 7
    assert a[:13] == cause[:13]  # same millisecond timestamp as the cause


def test_topic_helpers():
    assert topics.event_type(topics.INSTANCE_STORED) == "enclave.instance.stored"
    assert topics.event_type(topics.dlq(topics.INSTANCE_STORED)) == "enclave.instance.stored"
    assert topics.major_version(topics.INSTANCE_STORED) == 1
    assert len(set(topics.ALL_TOPICS)) == len(topics.ALL_TOPICS)
    import re

    pattern = re.compile(topics.AUDITED_PATTERN)
    assert pattern.fullmatch(topics.INSTANCE_STORED)
    assert pattern.fullmatch(topics.dlq(topics.UPLOAD_CHUNK))
    assert not pattern.fullmatch(topics.UPLOAD_CHUNK)


def test_every_topic_has_a_message_schema_that_accepts_its_events() -> None:
    """The AsyncAPI message schemas (``envelope_schema``) cover every topic and match real envelopes."""
    from enclave_common.events import TOPIC_DATA, KeyEvent, envelope_schema

    assert set(TOPIC_DATA) == set(topics.ALL_TOPICS)
    event = Envelope.for_topic(
        topics.KEY_CREATED,
        KeyEvent(operation="created", key_id="study:t:s", study_key="s"),
        source="test",
        tenant="t",
        actor="service:test",
        correlation_id="c",
    )
    model = envelope_schema(topics.KEY_CREATED)
    assert model.model_validate(event.model_dump(mode="json")).data.study_key == "s"
    schema = model.model_json_schema()
    assert schema["properties"]["data"]["$ref"].endswith("/KeyEvent")


def test_an_unexpected_error_is_named_with_where_it_was_raised_and_no_values() -> None:
    from enclave_common.errors import classify_exception

    def handler() -> None:
        int("PHI-MRN-4711")  # a third-party error whose text quotes the value

    try:
        handler()
    except ValueError as exc:
        classified = classify_exception(exc)
    text = str(classified)
    assert "unexpected ValueError" in text and "in handler" in text and "test_envelope.py:" in text
    assert "PHI-MRN-4711" not in text
