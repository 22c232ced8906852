"""FHIR R4 AuditEvent and searchset Bundle shapes, validated by fhir.resources (R4B models)."""

from __future__ import annotations

from types import SimpleNamespace

import pydantic
import pytest
from enclave_audit import codes
from enclave_audit.api import read_fhir_id
from enclave_audit.chain import HashChain
from enclave_audit.fhir import DCM_SYSTEM, to_fhir_audit_event, to_fhir_bundle, validate_fhir
from enclave_audit.records import record_from_event
from enclave_audit.store import EventQuery


@pytest.fixture
def access_record(make_access):
    draft = record_from_event(
        make_access(action="retrieve", target="/studies/sk-1/series/se-1", source_address="192.0.2.10"),
        "enclave.access.recorded.v1",
    )
    return HashChain().append(draft)


def test_access_record_as_audit_event(access_record):
    event = to_fhir_audit_event(access_record)
    validate_fhir(event)
    assert event["resourceType"] == "AuditEvent"
    assert event["id"] == access_record.event_id
    assert event["type"] == {"system": DCM_SYSTEM, "code": "110103", "display": "DICOM Instances Accessed"}
    assert event["action"] == "R"
    assert event["outcome"] == "0"
    assert event["recorded"].endswith("Z")
    requestor = event["agent"][0]
    assert requestor["requestor"] is True
    assert requestor["who"]["identifier"]["value"] == "dr-who"
    assert requestor["role"] == [{"text": "clinician"}]
    assert requestor["network"] == {"address": "192.0.2.10", "type": "2"}
    assert event["agent"][1]["type"]["coding"][0]["code"] == "110150"
    studies = [e for e in event["entity"] if e["what"]["identifier"]["system"] == "urn:enclave:study"]
    assert studies[0]["what"]["identifier"]["value"] == "sk-1"
    assert studies[0]["role"]["code"] == "3"
    assert event["source"]["site"] == "hospital-a"


def test_failed_login_has_subtype_and_outcome(make_access):
    draft = record_from_event(
        make_access(action="login", outcome="unauthenticated", target=None), "enclave.access.recorded.v1"
    )
    event = to_fhir_audit_event(HashChain().append(draft))
    validate_fhir(event)
    assert event["type"]["code"] == codes.USER_AUTHENTICATION.code
    assert event["subtype"] == [{"system": DCM_SYSTEM, "code": "110122", "display": "Login"}]
    assert event["outcome"] == "4"
    assert event["outcomeDesc"] == "unauthenticated (403)"


def test_every_mapped_topic_produces_a_valid_audit_event(make_envelope):
    chain = HashChain()
    for topic in [
        "enclave.upload.received.v1",
        "enclave.instance.deidentified.v1",
        "enclave.analysis.failed.v1",
        "enclave.key.rotated.v1",
        "enclave.security.alert.v1",
        "enclave.widget.frobbed.v1",
        "enclave.instance.stored.v1.dlq",
    ]:
        event_type = topic.removesuffix(".dlq").rsplit(".v", 1)[0]
        data = {"patient_pseudonym": "pp-1", "study_key": "sk-1", "rule": "break_glass", "severity": "high"}
        record = chain.append(record_from_event(make_envelope(event_type, data=data), topic))
        validate_fhir(to_fhir_audit_event(record))


def test_non_fhir_event_id_falls_back_to_sequence(make_envelope):
    record = HashChain().append(
        record_from_event(make_envelope() | {"id": "ev:1/2"}, "enclave.instance.stored.v1")
    )
    assert to_fhir_audit_event(record)["id"] == "seq-1"


def test_searchset_bundle_with_links(make_chain):
    records = make_chain(3)
    bundle = to_fhir_bundle(
        records,
        base_url="https://audit.example/fhir/",
        self_url="https://audit.example/audit/events",
        next_url="https://audit.example/audit/events?cursor=3",
        total=10,
    )
    validate_fhir(bundle)
    assert bundle["type"] == "searchset"
    assert [e["resource"]["id"] for e in bundle["entry"]] == [
        fhir_id for fhir_id in (r.event_id for r in records)
    ]
    assert bundle["entry"][0]["fullUrl"] == f"https://audit.example/fhir/AuditEvent/{records[0].event_id}"
    assert {link["relation"] for link in bundle["link"]} == {"self", "next"}


def test_validator_rejects_a_broken_shape(access_record):
    event = to_fhir_audit_event(access_record)
    del event["agent"][0]["requestor"]
    with pytest.raises(pydantic.ValidationError):
        validate_fhir(event)
    event = to_fhir_audit_event(access_record)
    event["action"] = "X"
    with pytest.raises(ValueError, match="action"):
        validate_fhir(event)
    event = to_fhir_audit_event(access_record)
    event["outcome"] = "3"
    with pytest.raises(ValueError, match="outcome"):
        validate_fhir(to_fhir_bundle([], base_url="https://a.example") | {"entry": [{"resource": event}]})


class ListStore:
    """``AuditStore.query`` over a list: the filters the FHIR read uses (tenant, event id, sequence)."""

    def __init__(self, records: list) -> None:
        self.records = records

    async def query(self, query: EventQuery, limit: int, *, timeout_s: float | None = None) -> list:
        def keep(r) -> bool:
            return (
                query.tenant in (None, r.tenant)
                and query.event_id in (None, r.event_id)
                and (query.after_sequence is None or r.sequence > query.after_sequence)
            )

        return [r for r in self.records if keep(r)][:limit]


async def test_a_fhir_id_reads_its_record_within_the_tenant(make_envelope):
    """The searchset's fullUrl names ``<base>/AuditEvent/<id>``: the read finds the record by the id the
    resource carries (the event id, or ``seq-<n>`` when FHIR does not allow the event id), and only
    within the caller's tenant."""
    chain = HashChain()
    plain = chain.append(record_from_event(make_envelope() | {"tenant": "t1"}, "enclave.instance.stored.v1"))
    odd = chain.append(
        record_from_event(make_envelope() | {"id": "ev:1/2", "tenant": "t1"}, "enclave.instance.stored.v1")
    )
    ctx = SimpleNamespace(store=ListStore([plain, odd]))
    for record in (plain, odd):
        resource_id = to_fhir_audit_event(record)["id"]
        assert await read_fhir_id(ctx, resource_id, "t1") == record  # type: ignore[arg-type]
        assert await read_fhir_id(ctx, resource_id, None) == record  # type: ignore[arg-type]
        assert await read_fhir_id(ctx, resource_id, "t2") is None  # type: ignore[arg-type]
    assert to_fhir_audit_event(odd)["id"] == "seq-2"
    for absent in ("seq-3", "seq-1", "no-such-id", f"seq-{2**63}"):  # seq-1's fhir id is its event id
        assert await read_fhir_id(ctx, absent, None) is None  # type: ignore[arg-type]
