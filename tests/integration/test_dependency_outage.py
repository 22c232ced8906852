"""A dependency stops answering under the running services: paused with SIGSTOP, its port still
accepts connections and requests, and nothing comes back, like a hung or partitioned server.

- The database (FerretDB): every HTTP route that needs it answers 503 with ``Retry-After`` and says
  what did not answer, within a bounded time (pymongo's monitor gives up on the silent server); none
  answers 500 or hangs. Once it answers again, a retried upload is stored and the audit chain, which
  was being appended to during the outage, verifies.
- The object store (MinIO): uploads are still accepted, ingest reports it is not ready, and the
  instance acknowledged meanwhile is stored once the store answers again.
- Kafka: uploads and reads answer 503 once the gateway's publish timeout has passed (nothing can be
  audited or handed off), and uploads go on once it answers again.
- The object store down while an auditor verifies the trail: 503, not a failed verification.

The dependency is resumed in ``finally`` and every service's readiness awaited, since all of them
share it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager

import httpx
import pytest

from .conftest import SERVICE_PORTS
from .support import kill_hard, mr_instance, paused, restart
from .test_gateway_support import GATEWAY, bearer, new_tenant, wait_for_status

STORED_OR_BEYOND = {"stored", "deidentified", "quarantined", "analysed"}
AUDIT_URL = f"http://127.0.0.1:{SERVICE_PORTS['audit']}"
#: pymongo's monitor checks the server every 10 s and waits up to 20 s for its answer: an operation
#: on a silent server fails within ~30 s. The bound below leaves room for a busy machine.
ANSWER_WITHIN_S = 75
#: The gateway's reads and an upload's record writes have their own limits (ENCLAVE_GATEWAY_READ_TIMEOUT_S
#: and ENCLAVE_GATEWAY_WRITE_TIMEOUT_S, 10 s): answered within them, not the monitor's ~30 s. The bound
#: leaves room for a busy machine.
READ_ANSWERED_WITHIN_S = 18
#: Concurrent status reads while the database is silent.
STATUS_BURST = 8


async def _timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    answer = await request
    return answer, time.monotonic() - started


async def _all_ready(client: httpx.AsyncClient, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    waiting = dict(SERVICE_PORTS)
    while waiting and time.monotonic() < deadline:
        for name, port in list(waiting.items()):
            try:
                if (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    del waiting[name]
            except httpx.HTTPError:
                pass
        await asyncio.sleep(1)
    assert not waiting, f"not ready again after the database answered again: {sorted(waiting)}"


@asynccontextmanager
async def _silent(client: httpx.AsyncClient, component: str) -> AsyncIterator[None]:
    """``component`` paused for the block; afterwards every service's readiness is awaited, whatever
    the block did, since they all share it."""
    try:
        with paused(component):
            yield
    finally:
        await _all_ready(client)


async def _upload(client: httpx.AsyncClient, headers: dict[str, str], instance: bytes) -> httpx.Response:
    """One instance through the upload API."""
    return await client.post(
        f"{GATEWAY}/api/v1/imaging/upload",
        files=[("file", ("i.dcm", instance, "application/dicom"))],
        headers=headers,
    )


def _assert_refused(answer: httpx.Response, code: str) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers.get("retry-after")
    assert code in answer.text
    assert "retry later" in answer.text


@pytest.mark.slow
async def test_a_silent_database_is_a_503_on_every_route_and_a_retry_afterwards_is_stored():
    tenant = new_tenant("it-db")
    uploader = bearer("it-db-pacs", tenant, "uploader")
    auditor = bearer("it-db-auditor", "enclave-operator", "auditor")
    async with httpx.AsyncClient(timeout=120) as client:
        before = await _upload(client, uploader, mr_instance()[0])
        assert before.status_code == 200, before.text
        known = before.json()["accepted"][0]["imaging_id"]
        await wait_for_status(client, f"{GATEWAY}/api/v1/imaging/{known}", uploader, STORED_OR_BEYOND)

        retry, _ = mr_instance()
        async with _silent(client, "ferretdb"):
            started = time.monotonic()
            # The patient query's decision looks the patient's restriction up (a clinician) or the
            # principal's grants (a caregiver) before any read of the read model: under the same limit.
            patient_query = f"{GATEWAY}/api/v1/imaging/patient/PID-OUTAGE"
            clinician = bearer("it-db-clinician", tenant, "clinician")
            caregiver = bearer("it-db-caregiver", tenant, "caregiver")
            # Status reads in a burst: more than the gateway's idle connections, so some wait for new
            # ones, which hang on the silent server (pymongo connects at most two at once). That wait
            # ended as a 500 until the twenty-fourth session (WaitQueueTimeoutError; CI found it).
            upload, stow, audit, restriction, grants, *statuses = await asyncio.gather(
                _timed(_upload(client, uploader, retry)),
                _timed(
                    client.post(
                        f"{GATEWAY}/dicomweb/studies",
                        content=mr_instance()[0],
                        headers={**uploader, "Content-Type": "application/dicom"},
                    )
                ),
                client.get(f"{AUDIT_URL}/audit/events", params={"limit": 1}, headers=auditor),
                _timed(client.get(patient_query, headers=clinician)),
                _timed(client.get(patient_query, headers=caregiver)),
                *(
                    _timed(client.get(f"{GATEWAY}/api/v1/imaging/{known}", headers=uploader))
                    for _ in range(STATUS_BURST)
                ),
            )
            took = time.monotonic() - started
            # An upload's record write has its own limit (ENCLAVE_GATEWAY_WRITE_TIMEOUT_S, 10 s).
            for _, write_took in (upload, stow):
                assert write_took < READ_ANSWERED_WITHIN_S, (
                    f"an upload's record write took {write_took:.0f} s"
                )
            upload, stow = upload[0], stow[0]
            for looked_up, lookup_took in (restriction, grants):
                _assert_refused(looked_up, "dependency_unavailable")
                assert lookup_took < READ_ANSWERED_WITHIN_S, f"the decision's lookup took {lookup_took:.0f} s"
            _assert_refused(upload, "database_unavailable")
            assert "imaging_id" not in upload.text
            assert "recognised by ingest as a duplicate" in upload.text
            _assert_refused(stow, "database_unavailable")
            assert "ReferencedSOPSequence" not in stow.text
            for status, status_took in statuses:
                _assert_refused(status, "dependency_unavailable")
                assert "the database did not answer" in status.text
                assert status_took < READ_ANSWERED_WITHIN_S, f"a status read took {status_took:.0f} s"
            _assert_refused(audit, "dependency_unavailable")
            assert took < ANSWER_WITHIN_S, f"the answers took {took:.0f} s"
            assert (await client.get(f"{GATEWAY}/healthz")).status_code == 200  # alive, just not ready
            assert (await client.get(f"{GATEWAY}/readyz")).status_code == 503

        again = await _upload(client, uploader, retry)
        assert again.status_code == 200, again.text
        retried = again.json()["accepted"][0]["imaging_id"]
        await wait_for_status(
            client, f"{GATEWAY}/api/v1/imaging/{retried}", uploader, STORED_OR_BEYOND, timeout=180
        )
        # Audit was appending to its hash chain when the database went silent (the refused requests'
        # access events): the chain has no gap, no duplicate and no broken link.
        report = await client.get(f"{AUDIT_URL}/audit/verify", headers=auditor, timeout=300)
        assert report.status_code == 200, report.text
        assert report.json()["ok"] is True, report.text


@pytest.mark.slow
async def test_a_silent_object_store_holds_nothing_back_once_it_answers_again():
    """MinIO paused (SIGSTOP): the gateway still accepts uploads (it holds no object-store
    credentials), ingest says it is not ready and why, and once MinIO answers again the instance
    acknowledged meanwhile is stored: a handler blocked on the silent store resumes, nothing is lost."""
    tenant = new_tenant("it-s3")
    uploader = bearer("it-s3-pacs", tenant, "uploader")
    ingest_ready = f"http://127.0.0.1:{SERVICE_PORTS['ingest']}/readyz"
    async with httpx.AsyncClient(timeout=120) as client:
        async with _silent(client, "minio"):
            answer = await _upload(client, uploader, mr_instance()[0])
            assert answer.status_code == 200, answer.text
            imaging_id = answer.json()["accepted"][0]["imaging_id"]
            readiness = await client.get(ingest_ready)
            assert readiness.status_code == 503
            assert readiness.json()["checks"]["object_store"].startswith("unavailable")
            await asyncio.sleep(15)  # ingest meets the silent store meanwhile
            status = await client.get(f"{GATEWAY}/api/v1/imaging/{imaging_id}", headers=uploader)
            assert status.status_code == 200 and status.json()["status"] == "received"
        await wait_for_status(client, f"{GATEWAY}/api/v1/imaging/{imaging_id}", uploader, STORED_OR_BEYOND)


@pytest.mark.slow
async def test_a_silent_kafka_is_a_503_within_the_publish_timeout_and_uploads_go_on_after():
    """Kafka paused (SIGSTOP): nothing can be audited or handed off, so an upload and a read answer 503
    with ``Retry-After`` once the gateway's publish timeout (15 s) has passed, not hang; once Kafka
    answers again an upload is acknowledged and stored."""
    tenant = new_tenant("it-kh")
    uploader = bearer("it-kh-pacs", tenant, "uploader")
    async with httpx.AsyncClient(timeout=120) as client:
        async with _silent(client, "kafka"):
            started = time.monotonic()
            upload, read = await asyncio.gather(
                _upload(client, uploader, mr_instance()[0]),
                client.get(
                    f"{GATEWAY}/api/v1/imaging/01a204ee-0000-7000-8000-000000000000", headers=uploader
                ),
            )
            took = time.monotonic() - started
            for answer in (upload, read):
                _assert_refused(answer, "kafka_unavailable")
            assert "imaging_id" not in upload.text
            assert took < ANSWER_WITHIN_S, f"the answers took {took:.0f} s"
        after = await _upload(client, uploader, mr_instance()[0])
        assert after.status_code == 200, after.text
        imaging_id = after.json()["accepted"][0]["imaging_id"]
        await wait_for_status(client, f"{GATEWAY}/api/v1/imaging/{imaging_id}", uploader, STORED_OR_BEYOND)


@pytest.mark.slow
async def test_verifying_the_audit_trail_while_the_object_store_is_down_is_a_503_not_a_failed_verification():
    """The trail's checkpoints are compared with their WORM copies in MinIO. With MinIO down, that
    says nothing about the trail: the auditor gets 503 (retry), and no verification failure is counted
    (it pages as possible tampering)."""
    auditor = bearer("it-s3-auditor", "enclave-operator", "auditor")
    async with httpx.AsyncClient(timeout=300) as client:
        before = _verify_failures((await client.get(f"{AUDIT_URL}/metrics")).text)
        kill_hard("minio")
        try:
            answer = await client.get(f"{AUDIT_URL}/audit/verify", headers=auditor)
        finally:
            restart("minio")
            await _all_ready(client)
        _assert_refused(answer, "dependency_unavailable")
        assert "the object store did not answer" in answer.text
        assert _verify_failures((await client.get(f"{AUDIT_URL}/metrics")).text) == before
        again = await client.get(f"{AUDIT_URL}/audit/verify", headers=auditor)
        assert again.status_code == 200 and again.json()["ok"] is True, again.text


def _verify_failures(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("enclave_audit_verify_failures_total "):
            return float(line.split()[1])
    raise AssertionError("enclave_audit_verify_failures_total is not exported")
