"""The gateway's own metrics: what the uploads in progress keep in the spool's memory and on its disk,
how many uploads are in progress, each against its limit, and the uploads refused for want of room.
Until the eighteenth session none of it was on /metrics: the spool's process-wide memory cap
(``ENCLAVE_GATEWAY_SPOOL_MEMORY_TOTAL_BYTES``) and disk limit could fill unseen."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from corpus import builders
from enclave_gateway.admission import DEFAULT_MAX_CONCURRENT_UPLOADS
from enclave_gateway.config import GatewaySettings
from enclave_gateway.main import create_app
from enclave_gateway.metrics import GatewayMetrics
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from route_harness import gateway_routes, stow_request
from test_spool_memory import CHUNK, INSTANCE, body, holding, processor

PSEUDONYM_KEY = SecretStr(base64.b64encode(bytes(32)).decode())
MEMORY, MEMORY_CAP = "enclave_gateway_spool_memory_bytes", "enclave_gateway_spool_memory_capacity_bytes"
DISK, DISK_CAP = "enclave_gateway_spool_disk_bytes", "enclave_gateway_spool_disk_capacity_bytes"


async def test_the_spool_gauges_follow_what_the_uploads_in_progress_hold(tmp_path: Path) -> None:
    uploads = processor(tmp_path, total=80 * 1024, disk=1 << 20)  # room in memory for one instance
    registry = CollectorRegistry()
    GatewayMetrics(registry, uploads)

    def value(name: str) -> float | None:
        return registry.get_sample_value(name)

    assert (value(MEMORY_CAP), value(DISK_CAP)) == (80 * 1024, 1 << 20)
    assert (value(MEMORY), value(DISK)) == (0, 0)
    hold = asyncio.Event()
    first_task = asyncio.ensure_future(
        uploads.receive("application/dicom", body(INSTANCE, hold_before_last=hold), tenant="hospital-a")
    )
    held = await holding(uploads.spool_memory, 4 * CHUNK)
    assert value(MEMORY) == held > 0
    second = await uploads.receive("application/dicom", body(INSTANCE), tenant="hospital-a")
    assert not second.accepted[0].sealed.in_memory  # past the shared budget: on disk
    assert value(DISK) == uploads.spool_disk.used > 0
    assert value(MEMORY) == held
    hold.set()
    first = await first_task
    assert value(MEMORY) == uploads.spool_memory.used > held
    await uploads.publish(first, tenant="hospital-a", actor="pacs-1")
    await uploads.publish(second, tenant="hospital-a", actor="pacs-1")
    assert (value(MEMORY), value(DISK)) == (0, 0)


def test_without_a_disk_limit_there_is_no_disk_capacity_gauge(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    GatewayMetrics(registry, processor(tmp_path, total=1 << 20))
    assert registry.get_sample_value(DISK) == 0
    assert registry.get_sample_value(DISK_CAP) is None


def test_the_gateway_exports_its_limits_and_refusals_on_metrics() -> None:
    settings = GatewaySettings(
        pseudonym_key=PSEUDONYM_KEY,
        spool_memory_total_bytes=96 * 1024 * 1024,
        spool_disk_bytes=5 * 1024**3,
        max_concurrent_uploads=17,
    )
    text = TestClient(create_app(settings)).get("/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[(MEMORY_CAP, ())] == 96 * 1024 * 1024
    assert samples[(DISK_CAP, ())] == 5 * 1024**3
    assert samples[("enclave_gateway_max_concurrent_uploads", ())] == 17
    for name in (MEMORY, DISK, "enclave_gateway_uploads_in_progress"):
        assert samples[(name, ())] == 0
    for reason in ("too_many_uploads", "spool_unavailable"):  # at 0 before the first refusal
        assert samples[("enclave_gateway_uploads_refused_total", (("reason", reason),))] == 0


def test_the_concurrency_setting_and_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings().max_concurrent_uploads == DEFAULT_MAX_CONCURRENT_UPLOADS == 128
    monkeypatch.setenv("ENCLAVE_GATEWAY_MAX_CONCURRENT_UPLOADS", "4")
    assert GatewaySettings().max_concurrent_uploads == 4
    monkeypatch.setenv("ENCLAVE_GATEWAY_MAX_CONCURRENT_UPLOADS", "0")
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        GatewaySettings()


async def test_an_upload_the_spool_cannot_hold_is_counted_as_refused_for_want_of_room(tmp_path: Path) -> None:
    harness = gateway_routes(tmp_path)
    harness.uploads.spool_memory_bytes = 0  # every sealed chunk goes to the spool directory,
    harness.uploads.spool_dir = tmp_path / "removed"  # which is gone (a cleaner of /tmp, a full disk)
    body = builders.multipart_body([builders.make_instance()])
    answer = await stow_request(harness, [body.data], content_type=body.content_type)
    assert answer.status == 503, answer.body
    assert json.loads(answer.body)["error"] == "spool_unavailable"
    refused = "enclave_gateway_uploads_refused_total"
    assert harness.registry.get_sample_value(refused, {"reason": "spool_unavailable"}) == 1
    assert harness.registry.get_sample_value(refused, {"reason": "too_many_uploads"}) == 0
    # Recorded as refused (until a review of the eighteenth session only the allowed decision was),
    # and only so (until the nineteenth session the allowed decision came first, as success 200).
    mine = [
        e for e in harness.publisher.access_events() if e["correlation_id"] == answer.header("x-request-id")
    ]
    assert [(e["action"], e["outcome"], e["status_code"], e["detail"]) for e in mine] == [
        ("upload", "rejected", 503, "spool_unavailable"),
    ]


async def test_an_upload_the_database_did_not_record_is_recorded_as_an_error(tmp_path: Path) -> None:
    """503 ``database_unavailable``: the access trail says the upload ended in an error, not only that
    the uploader's role allowed it (until the eighteenth session)."""
    from pymongo.errors import ServerSelectionTimeoutError

    harness = gateway_routes(tmp_path)

    async def silent(*_: object) -> None:
        raise ServerSelectionTimeoutError("no server answered")

    harness.read_model.record_uploads = silent  # type: ignore[method-assign]
    body = builders.multipart_body([builders.make_instance()])
    answer = await stow_request(harness, [body.data], content_type=body.content_type)
    assert answer.status == 503, answer.body
    assert json.loads(answer.body)["error"] == "database_unavailable"
    # "error", not "rejected": the instances may have been handed off already (ingest stores them).
    [event] = harness.publisher.access_events()
    assert (event["action"], event["outcome"], event["status_code"], event["detail"]) == (
        "upload",
        "error",
        503,
        "database_unavailable",
    )
    assert event["correlation_id"] == answer.header("x-request-id")
