"""The file descriptors an upload holds do not grow with its part count (``SpoolFile`` in
services/gateway/src/enclave_gateway/handoff.py), on a gateway process of its own whose every sealed
chunk spills to the spool (no memory budget).

Until the nineteenth session each spilled instance kept an unnamed file of its own open until the
hand-off: one STOW request of 300 small instances held 300 descriptors, and a request of 10,000 parts
(``MAX_PARTS``) 10,000, so 128 uploads (``MAX_CONCURRENT_UPLOADS``) could exhaust the process's
descriptors (a Kubernetes container commonly gets a soft limit of 1,024) and fail every other request,
Kafka's and the database's sockets with them. Measured here from ``/proc/<pid>/fd`` while the request
is held before its closing boundary, with everything but the last part received and spilled: one
spool file now, 299 before. Then, with the gateway's descriptor limit lowered to 64 above what it
uses, a request of 150 parts is accepted and handed off whole (before: 503 ``spool_unavailable``,
"ran out of open files")."""

from __future__ import annotations

import asyncio
import os
import re
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from enclave_common import topics

from .test_gateway_support import GatewayProcess, TopicWatch, bearer, builders, gateway_process, new_tenant

UPLOAD_TOPICS = (topics.UPLOAD_RECEIVED, topics.UPLOAD_COMPLETED)
EVERYTHING_SPILLS = {
    "ENCLAVE_GATEWAY_SPOOL_MEMORY_BYTES": "0",
    "ENCLAVE_GATEWAY_SPOOL_MEMORY_TOTAL_BYTES": "0",
}


@pytest.fixture(scope="module")
def spilling_gateway(tmp_path_factory: pytest.TempPathFactory):
    with gateway_process(tmp_path_factory.mktemp("gw-spool-fds"), EVERYTHING_SPILLS) as gateway:
        yield gateway


def _pid(gateway: GatewayProcess) -> int:
    assert gateway.process is not None
    return gateway.process.pid


def _descriptors(pid: int, under: Path | None = None) -> int:
    """The process's open descriptors; with ``under``, those on files in that directory (the spool's
    files are unnamed: their links read ``<dir>/#<inode> (deleted)``)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        count += under is None or target.startswith(f"{under}/")
    return count


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not on /metrics"
    return float(found.group(1))


def _body_held_before_its_end(data: bytes, closing: bytes, release: asyncio.Event) -> AsyncIterator[bytes]:
    async def stream() -> AsyncIterator[bytes]:
        head = data[: -len(closing)]
        for at in range(0, len(head), 65536):
            yield head[at : at + 65536]
        await release.wait()
        yield closing

    return stream()


async def _handed_off(watch: TopicWatch, tenant: str, parts: int) -> None:
    events = await watch.read(lambda e: e.tenant == tenant)
    received = [e for e in events if e.type == topics.event_type(topics.UPLOAD_RECEIVED)]
    [completed] = [e for e in events if e.type == topics.event_type(topics.UPLOAD_COMPLETED)]
    assert len(received) == parts == completed.data["accepted"]
    assert {e.data["instance_upload_id"] for e in received} == set(completed.data["instance_upload_ids"])


async def test_a_request_of_300_spilled_parts_holds_one_spool_file(spilling_gateway: GatewayProcess) -> None:
    url, pid = spilling_gateway.url, _pid(spilling_gateway)
    spool = Path(spilling_gateway.env["ENCLAVE_GATEWAY_SPOOL_DIR"])
    tenant = new_tenant("it-spool-fds")
    headers = bearer("it-spool-fds-pacs", tenant, "uploader")
    instances = [builders.make_instance() for _ in range(300)]
    body = builders.multipart_body(instances)
    closing = b"\r\n--enclave-boundary-42--"
    assert body.data.endswith(closing)
    release = asyncio.Event()

    async with TopicWatch(*UPLOAD_TOPICS) as watch, httpx.AsyncClient(timeout=120) as client:
        upload = asyncio.ensure_future(
            client.post(
                f"{url}/dicomweb/studies",
                content=_body_held_before_its_end(body.data, closing, release),
                headers={**headers, "Content-Type": body.content_type},
            )
        )
        # Sealing adds bytes: once the spool holds more than the first 299 instances' plaintext,
        # all of them were received, sealed and spilled (the last ends with the closing boundary).
        spilled = sum(len(instance) for instance in instances[:-1])
        for _ in range(600):
            metrics = (await client.get(f"{url}/metrics")).text
            if _metric(metrics, "enclave_gateway_spool_disk_bytes") > spilled or upload.done():
                break
            await asyncio.sleep(0.1)
        assert not upload.done(), upload.result().text
        assert _metric(metrics, "enclave_gateway_spool_disk_bytes") > spilled
        held = _descriptors(pid, spool)
        assert (await client.get(f"{url}/healthz")).status_code == 200
        release.set()
        answer = await upload
        assert answer.status_code == 200, answer.text
        assert held == 1, f"the request held {held} spool files for 299 spilled instances; one is the bound"
        assert _descriptors(pid, spool) == 0
        metrics = (await client.get(f"{url}/metrics")).text
        assert _metric(metrics, "enclave_gateway_spool_disk_bytes") == 0
        await _handed_off(watch, tenant, 300)


async def test_a_request_of_more_parts_than_free_descriptors_is_accepted_whole(
    spilling_gateway: GatewayProcess,
) -> None:
    url, pid = spilling_gateway.url, _pid(spilling_gateway)
    tenant = new_tenant("it-spool-fds")
    headers = bearer("it-spool-fds-pacs", tenant, "uploader")
    body = builders.multipart_body([builders.make_instance() for _ in range(150)])
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (_descriptors(pid) + 64, hard))
    try:
        async with TopicWatch(*UPLOAD_TOPICS) as watch, httpx.AsyncClient(timeout=120) as client:
            answer = await client.post(
                f"{url}/dicomweb/studies",
                content=body.data,
                headers={**headers, "Content-Type": body.content_type},
            )
            assert answer.status_code == 200, answer.text
            assert (await client.get(f"{url}/healthz")).status_code == 200
            await _handed_off(watch, tenant, 150)
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
