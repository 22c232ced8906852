"""All five services run, answer liveness, readiness (every dependency reachable) and metrics."""

from __future__ import annotations

import httpx
import pytest

from .conftest import SERVICE_PORTS

#: The readiness check of the local directory each service writes instances to.
LOCAL_DISK = {"gateway": "spool", "ingest": "spool", "deid": "work_dir"}


@pytest.mark.parametrize("service", sorted(SERVICE_PORTS))
def test_service_is_alive_ready_and_exports_metrics(service):
    base = f"http://127.0.0.1:{SERVICE_PORTS[service]}"
    alive = httpx.get(f"{base}/healthz", timeout=10)
    assert alive.status_code == 200
    assert alive.json() == {"status": "alive", "service": service}
    ready = httpx.get(f"{base}/readyz", timeout=20)
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["kafka"] == "ok" and checks["mongodb"] == "ok"
    if service in LOCAL_DISK:  # the directory it writes to exists, is writable and has room
        assert checks[LOCAL_DISK[service]] == "ok"
    metrics = httpx.get(f"{base}/metrics", timeout=10)
    assert metrics.status_code == 200
    assert "enclave_http_requests" in metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
