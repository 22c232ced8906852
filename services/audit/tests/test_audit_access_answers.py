"""The auditor API's own access records claim the answer the caller got: each call is one
``access.recorded`` event whose ``status_code`` and ``outcome`` are its answer's. Until the twentieth
session an allowed call was recorded at its decision, ``success`` 200, before the route ran: a bad
cursor or range (400), an absent FHIR id (404) and a database that did not answer (503) were all
recorded as 200, and an export refused 422 for its range was not recorded at all.

Each call goes through the service's real HTTP app (``ServiceRuntime.http_app``: its exception
handlers answer the 422 and the 503) and the real guard, over a store and a publisher that share one
log, so the tests see what was read before the record was published."""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from aiokafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError
from enclave_audit import api
from enclave_audit.api import AuditApiContext, access_hook, build_router
from enclave_audit.chain import GENESIS, ChainHead
from enclave_audit.export import RECORDS_PATH
from enclave_audit.records import AuditRecord
from enclave_audit.signing import Ed25519Signer
from enclave_audit.store import EventQuery, QueryTimeout
from enclave_common.auth import StaticKeySource, TokenRules, TokenVerifier
from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER, DevIssuer
from enclave_common.auth.fastapi import AccessGuard
from enclave_common.service import ServiceRuntime
from enclave_common.settings import BaseServiceSettings
from pymongo.errors import NetworkTimeout, ServerSelectionTimeoutError

from .conftest import chained_records

OPERATOR = "enclave-operator"
PLANTED = "PHIMARKER JANE DOE"
#: The event id of the second record of the trail (``conftest.envelope``'s ids).
RECORD_ID = "00000000-0000-0000-0000-000000000002"


class Trail:
    """The store, the export's reader and the publisher over one list of records, logging in order
    what was read (``read``) and what was recorded (``recorded``)."""

    def __init__(self, records: list[AuditRecord]) -> None:
        self.records = records
        self.log: list[str] = []
        self.recorded: list[dict[str, Any]] = []
        self.failure: Exception | None = None  # raised by every database read
        self.refusal: Exception | None = None  # raised by every publish

    # AuditStore
    async def query(
        self, query: EventQuery, limit: int, *, timeout_s: float | None = None
    ) -> list[AuditRecord]:
        self._read("query")
        found = [r for r in self.records if query.event_id in (None, r.event_id)]
        after = query.after_sequence
        return [r for r in found if after is None or r.sequence > after][:limit]

    async def checkpoints_between(self, first: int, last: int | None) -> list[Any]:
        self._read("checkpoints")
        return []

    # SyncRecordReader
    def head(self) -> ChainHead:
        self._read("head")
        last = self.records[-1]
        return ChainHead(last.sequence, last.record_hash)

    def anchor_before(self, first: int) -> ChainHead | None:
        return GENESIS if first == 1 else None

    def iter_records(self, first: int = 1, last: int | None = None) -> Iterator[AuditRecord]:
        self._read("bundle")
        return iter([r for r in self.records if first <= r.sequence <= (last or r.sequence)])

    # EventPublisher
    async def publish(self, topic: str, envelope: Any, *, key: str) -> None:
        if self.refusal is not None:
            raise self.refusal
        self.log.append("recorded")
        self.recorded.append(envelope.data)

    def _read(self, what: str) -> None:
        if self.failure is not None:
            raise self.failure
        self.log.append(what)


@pytest.fixture(scope="module")
def issuer() -> DevIssuer:
    return DevIssuer.generate(["ES256"])


@pytest.fixture
def trail() -> Trail:
    return Trail(chained_records(5))


@pytest.fixture
def ctx(trail: Trail) -> AuditApiContext:
    return context_over(trail)


def context_over(trail: Trail) -> AuditApiContext:
    """The API's context over ``trail``."""
    return AuditApiContext(
        store=trail,  # type: ignore[arg-type]
        reader=trail,  # type: ignore[arg-type]
        objects=SimpleNamespace(),  # type: ignore[arg-type]
        bucket="worm",
        metrics=SimpleNamespace(),  # type: ignore[arg-type]
        operator_tenant=OPERATOR,
        default_page_size=10,
        max_page_size=10,
        max_export_records=100,
        signer=Ed25519Signer.generate(),
    )


@pytest.fixture
async def client(issuer: DevIssuer, trail: Trail, ctx: AuditApiContext) -> AsyncIterator[httpx.AsyncClient]:
    rules = TokenRules(issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    verifier = TokenVerifier(rules, StaticKeySource.from_jwks(issuer.jwks(), algorithms=rules.algorithms))
    guard = AccessGuard(verifier, on_decision=access_hook(trail))  # type: ignore[arg-type]
    runtime = ServiceRuntime(BaseServiceSettings(service_name="audit-test"))
    app = runtime.http_app(title="audit", routers=[build_router(ctx, guard)], start_runtime=False)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://audit") as http:
        http.headers["Authorization"] = (
            f"Bearer {issuer.mint(subject='aud-1', tenant=OPERATOR, roles=['auditor'])}"
        )
        yield http


def the_one_record(trail: Trail) -> dict[str, Any]:
    """The call's record; there must be exactly one."""
    assert len(trail.recorded) == 1, trail.recorded
    return trail.recorded[0]


def claims(record: dict[str, Any], status: int, outcome: str, detail: str) -> None:
    assert (record["status_code"], record["outcome"], record["detail"]) == (status, outcome, detail)
    assert PLANTED not in repr(record) and "?" not in record["target"]


# ---- answers the caller caused ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"cursor": PLANTED}, "bad_cursor"),
        ({"since": "2026-11-24", "until": "2026-11-23"}, "bad_range"),
    ],
)
async def test_a_query_refused_400_is_recorded_as_its_400(client, trail, params, code) -> None:
    response = await client.get("/audit/events", params=params)
    assert response.status_code == 400 and response.json()["detail"]["code"] == code
    record = the_one_record(trail)
    claims(record, 400, "rejected", code)
    assert record["target"] == "/audit/events" and record["action"] == "audit_query"
    assert "query" not in trail.log  # nothing was read


async def test_an_absent_fhir_id_is_recorded_as_its_404(client, trail) -> None:
    response = await client.get("/audit/fhir/AuditEvent/no-such-record")
    assert response.status_code == 404 and response.json()["detail"]["code"] == "not_found"
    record = the_one_record(trail)
    claims(record, 404, "rejected", "not_found")
    assert record["target"] == "/audit/fhir/AuditEvent/{resource_id}"


@pytest.mark.parametrize("params", [{"from_sequence": 5, "to_sequence": 2}, {"from_sequence": 9}])
async def test_a_verify_range_refused_400_is_recorded_as_its_400(client, trail, monkeypatch, params) -> None:
    from enclave_audit import api
    from enclave_audit.verification import RangeBeyondChain

    async def beyond(ctx: Any, first: int, last: int | None) -> Any:
        raise RangeBeyondChain(first, 5, 5)

    monkeypatch.setattr(api, "verify_stored", beyond)
    response = await client.get("/audit/verify", params=params)
    assert response.status_code == 400 and response.json()["detail"]["code"] == "bad_range"
    record = the_one_record(trail)
    claims(record, 400, "rejected", "bad_range")
    assert record["action"] == "audit_verify"


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/audit/events", {"limit": 0}),
        ("/audit/verify", {"from_sequence": 0}),
        ("/audit/export", {"from_sequence": 0}),  # not recorded at all before
        ("/audit/export", {"to_sequence": "ten"}),
        # A misspelt filter (until the twenty-second session ignored: every record answered as if it
        # were that patient's) and a parameter the export does not take.
        ("/audit/events", {"patinet": "pk-1"}),
        ("/audit/export", {"patient": "pk-1"}),
    ],
)
async def test_a_parameter_the_api_refuses_is_recorded_as_its_422(client, trail, path, params) -> None:
    response = await client.get(path, params=params)
    assert response.status_code == 422 and response.json()["detail"]["code"] == "invalid_request"
    claims(the_one_record(trail), 422, "rejected", "invalid_request")
    assert "bundle" not in trail.log


# ---- answers the service could not give ---------------------------------------------------------


@pytest.mark.parametrize("failure", [ServerSelectionTimeoutError(PLANTED), NetworkTimeout(PLANTED)])
@pytest.mark.parametrize(
    "path",
    ["/audit/events", "/audit/fhir/AuditEvent/seq-1", "/audit/export"],
)
async def test_a_database_that_does_not_answer_is_recorded_as_the_503(client, trail, failure, path) -> None:
    trail.failure = failure
    response = await client.get(path)
    assert response.status_code == 503, response.text
    assert response.json()["detail"]["code"] == "dependency_unavailable"
    claims(the_one_record(trail), 503, "error", "dependency_unavailable")


async def test_a_query_past_its_time_limit_is_a_503_that_says_how_to_narrow_it(client, trail, ctx) -> None:
    """Past ``ENCLAVE_AUDIT_QUERY_TIMEOUT_S`` the store gives up (tests/integration/
    test_audit_query_bounds.py shows it on FerretDB): 503 ``query_timeout`` naming the setting and the
    filters that narrow a query, recorded as that answer (until the twentieth session a query had no
    time limit)."""
    trail.failure = QueryTimeout(ctx.query_timeout_s)
    response = await client.get("/audit/events")
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "10"
    detail = response.json()["detail"]
    assert detail["code"] == "query_timeout"
    assert "ENCLAVE_AUDIT_QUERY_TIMEOUT_S" in detail["message"] and "since/until" in detail["message"]
    claims(the_one_record(trail), 503, "error", "query_timeout")


async def test_a_route_that_fails_unexpectedly_is_recorded_as_the_500(client, trail) -> None:
    trail.failure = RuntimeError(PLANTED)
    response = await client.get("/audit/events")
    assert response.status_code == 500 and PLANTED not in response.text
    claims(the_one_record(trail), 500, "error", "internal_error")


async def test_a_key_not_loaded_yet_is_recorded_as_the_503(client, trail, ctx) -> None:
    ctx.signer = None
    for path in ("/audit/public-key", "/audit/export"):
        trail.recorded.clear()
        response = await client.get(path)
        assert response.status_code == 503 and response.json()["detail"]["code"] == "not_ready"
        claims(the_one_record(trail), 503, "error", "not_ready")


# ---- answers given ------------------------------------------------------------------------------


async def test_a_query_is_recorded_success_200_once_its_records_were_read_before_they_are_sent(
    client, trail
) -> None:
    response = await client.get("/audit/events")
    assert response.status_code == 200 and response.json()["count"] == 5
    record = the_one_record(trail)
    assert (record["status_code"], record["outcome"]) == (200, "success")
    assert trail.log == ["query", "recorded"]  # before: recorded at the decision, then read


async def test_a_fhir_read_is_recorded_success_200_once_its_record_was_read(client, trail) -> None:
    response = await client.get(f"/audit/fhir/AuditEvent/{RECORD_ID}")
    assert response.status_code == 200, response.text
    assert (the_one_record(trail)["status_code"], the_one_record(trail)["outcome"]) == (200, "success")
    assert trail.log[-1] == "recorded" and "query" in trail.log


@pytest.mark.parametrize("refusal", [KafkaTimeoutError(), TopicAuthorizationFailedError()])
@pytest.mark.parametrize("path", ["/audit/events", f"/audit/fhir/AuditEvent/{RECORD_ID}", "/audit/export"])
async def test_kafka_refusing_the_record_answers_503_and_sends_nothing_read(
    client, trail, refusal, path
) -> None:
    """Before: KafkaTimeoutError answered 503 ``dependency_unavailable`` and a Kafka error retrying
    cannot help (the topic refused to this service) a bare 500."""
    trail.refusal = refusal
    response = await client.get(path)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "10"
    assert response.json() == {
        "detail": {"code": "kafka_unavailable", "message": "the access could not be audited; retry later"}
    }
    assert not any(r.event_id in response.text for r in trail.records)


async def test_an_export_whose_record_kafka_refused_closes_its_bundle_spool(
    client, trail, monkeypatch
) -> None:
    """Built, then not sent: its spool (memory, then a file on /tmp) is closed at once, not left to
    the garbage collector."""
    spools: list[Any] = []
    real = api._write_bundle_file

    def tracked(*args: Any) -> Any:
        spools.append(real(*args))
        return spools[-1]

    monkeypatch.setattr(api, "_write_bundle_file", tracked)
    trail.refusal = KafkaTimeoutError()
    response = await client.get("/audit/export", params={"from_sequence": 1, "to_sequence": 5})
    assert response.status_code == 503, response.text
    [spool] = spools
    assert spool.closed


async def test_an_export_is_recorded_once_its_bundle_is_built_before_its_first_byte(client, trail) -> None:
    response = await client.get("/audit/export", params={"from_sequence": 1, "to_sequence": 5})
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as bundle:
        assert len(bundle.extractfile(RECORDS_PATH).read().splitlines()) == 5  # type: ignore[union-attr]
    record = the_one_record(trail)
    assert (record["status_code"], record["outcome"], record["action"]) == (200, "success", "audit_export")
    assert trail.log == ["head", "checkpoints", "bundle", "recorded"]


@pytest.mark.parametrize(
    ("params", "status", "outcome", "code"),
    [
        ({"from_sequence": 4, "to_sequence": 2}, 400, "rejected", "bad_range"),
        ({"from_sequence": 6}, 400, "rejected", "bad_range"),
        # The record before the range is missing: a fault of the trail, not of the request.
        ({"from_sequence": 2}, 409, "error", "broken_chain"),
    ],
)
async def test_an_export_refused_is_recorded_as_its_answer(
    client, trail, params, status, outcome, code
) -> None:
    response = await client.get("/audit/export", params=params)
    assert response.status_code == status and response.json()["detail"]["code"] == code
    claims(the_one_record(trail), status, outcome, code)


async def test_an_export_over_the_record_limit_is_recorded_as_its_413(client, trail, ctx) -> None:
    ctx.max_export_records = 3
    response = await client.get("/audit/export")
    assert response.status_code == 413
    claims(the_one_record(trail), 413, "rejected", "export_too_large")
    assert "bundle" not in trail.log


async def test_an_export_by_another_tenants_auditor_is_recorded_once_as_its_404(
    client, trail, issuer
) -> None:
    token = issuer.mint(subject="aud-2", tenant="hospital-a", roles=["auditor"])
    response = await client.get(
        "/audit/export", params={"from_sequence": 0}, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 404
    record = the_one_record(trail)
    assert (record["status_code"], record["outcome"]) == (404, "not_found")


async def test_a_call_the_server_cancels_is_recorded_as_the_500_it_gets(client, trail, monkeypatch) -> None:
    """The server's graceful-shutdown timeout cancels what still runs (an export being built); the
    call is recorded before the cancellation goes on. Before: ``success`` 200, at the decision."""
    reading = asyncio.Event()

    async def stuck(query: EventQuery, limit: int, *, timeout_s: float | None = None) -> list[AuditRecord]:
        reading.set()
        await asyncio.Event().wait()
        raise AssertionError("never answered")

    monkeypatch.setattr(trail, "query", stuck)
    call = asyncio.ensure_future(client.get("/audit/events"))
    await asyncio.wait_for(reading.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    claims(the_one_record(trail), 500, "error", "request_cancelled")


async def test_a_cancelled_calls_record_that_cannot_finish_in_time_is_cancelled_too(
    client, trail, monkeypatch
) -> None:
    """The record of a cancelled call waits at most RECORD_ON_CANCEL_S; past it the record itself is
    cancelled, not left running shielded and unseen (until the twenty-second session it ran on)."""
    from enclave_common import cancellation

    monkeypatch.setattr(cancellation, "RECORD_ON_CANCEL_S", 0.2)
    reading, publishing = asyncio.Event(), asyncio.Event()
    ended: list[str] = []

    async def stuck(query: EventQuery, limit: int, *, timeout_s: float | None = None) -> list[AuditRecord]:
        reading.set()
        await asyncio.Event().wait()
        raise AssertionError("never answered")

    async def silent_kafka(topic: str, envelope: Any, *, key: str) -> None:
        publishing.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    monkeypatch.setattr(trail, "query", stuck)
    monkeypatch.setattr(trail, "publish", silent_kafka)
    call = asyncio.ensure_future(client.get("/audit/events"))
    await asyncio.wait_for(reading.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, 5)
    assert publishing.is_set()
    await asyncio.sleep(0)  # the cancelled record's task runs its handler
    assert ended == ["cancelled"]


async def test_a_misspelt_filter_is_answered_with_the_filters_the_route_takes(client, trail) -> None:
    response = await client.get("/audit/events", params={"patinet": "pk-1"})
    assert response.status_code == 422
    [problem] = response.json()["detail"]["problems"]
    assert problem["field"] == "query" and "patient" in problem["problem"] and "actor" in problem["problem"]
    assert "patinet" not in response.text and "pk-1" not in response.text
    assert trail.log == ["recorded"], "nothing was read; the refusal was recorded"
