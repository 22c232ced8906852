"""A gateway whose spool cannot be written (here its directory was removed under the running process,
as a cleaner of /tmp would; a full disk is the same path, proven with the kernel's own ENOSPC in
``services/gateway/tests/test_handoff.py``): ``/readyz`` names the spool, so a load balancer takes
the replica out of rotation, and an upload that needs the spool answers 503 ``spool_unavailable``
with ``Retry-After`` instead of a bare 500. Nothing of it is handed off, nothing of the planted PHI
is in the answer, and once the spool is back the same instance is accepted and stored.

The gateway is a second process with every upload spilled to the spool (no memory budget)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
from enclave_common import topics

from .support import PHI, mr_instance
from .test_gateway_support import TopicWatch, bearer, gateway_process, new_tenant, wait_for_status

UPLOAD_TOPICS = (topics.UPLOAD_CHUNK, topics.UPLOAD_RECEIVED, topics.UPLOAD_COMPLETED)


def _readiness(url: str, wanted: int, timeout: float = 30.0) -> dict[str, str]:
    """``/readyz`` polled until it answers ``wanted``; its checks."""
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(f"{url}/readyz", timeout=10)
        if answer.status_code == wanted or time.monotonic() > deadline:
            assert answer.status_code == wanted, answer.text
            return dict(answer.json()["checks"])
        time.sleep(0.5)


async def test_an_unwritable_spool_is_a_503_that_hands_off_nothing_and_the_replica_is_not_ready(
    tmp_path: Path,
) -> None:
    with gateway_process(tmp_path, {"ENCLAVE_GATEWAY_SPOOL_MEMORY_BYTES": "0"}) as gateway:
        spool = Path(gateway.env["ENCLAVE_GATEWAY_SPOOL_DIR"])
        assert _readiness(gateway.url, 200)["spool"] == "ok"
        tenant = new_tenant("it-spool")
        headers = {**bearer("it-spool-pacs", tenant, "uploader"), "Content-Type": "application/dicom"}
        instance, _ = mr_instance()

        shutil.rmtree(spool)
        assert _readiness(gateway.url, 503)["spool"] == "unavailable (LocalDirectoryUnusable)"
        async with TopicWatch(*UPLOAD_TOPICS) as watch, httpx.AsyncClient(timeout=60) as client:
            refused = await client.post(f"{gateway.url}/dicomweb/studies", content=instance, headers=headers)
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "10"
            body = refused.json()
            assert body["error"] == "spool_unavailable"
            assert "nothing was accepted, retry later" in body["message"]
            assert not any(value in refused.text for value in PHI.values())
            assert await watch.read(lambda e: e.tenant == tenant) == []

            spool.mkdir()
            _readiness(gateway.url, 200)
            accepted = await client.post(f"{gateway.url}/dicomweb/studies", content=instance, headers=headers)
            assert accepted.status_code == 200, accepted.text
            [published] = await watch.read(
                lambda e: e.tenant == tenant and e.type == topics.event_type(topics.UPLOAD_COMPLETED)
            )
            [imaging_id] = published.data["instance_upload_ids"]
            await wait_for_status(
                client,
                f"{gateway.url}/api/v1/imaging/{imaging_id}",
                headers,
                {"stored", "deidentified", "quarantined", "analysed"},
                timeout=180,
            )
