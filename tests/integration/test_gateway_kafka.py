"""Kafka stopped under the gateway: uploads get 503 and acknowledge nothing; once Kafka is back,
everything acknowledged before the outage is stored. Kafka is restarted in ``finally`` and the
gateway's readiness awaited, since every other service shares it.

Ingest is restarted first, so the outage meets a producer that has not published yet: a restarted
broker answers "unknown topic" to its first metadata request for a while, and ingest used to
leave the instance it was storing behind until its next restart (the test then failed every time
on a freshly started stack)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from .support import kill_hard, mr_instance, restart
from .test_gateway_support import GATEWAY, bearer, new_tenant, wait_for_status

STORED_OR_BEYOND = {"stored", "deidentified", "quarantined", "analysed"}


async def _wait_ready(client: httpx.AsyncClient, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (await client.get(f"{GATEWAY}/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1)
    raise AssertionError("the gateway did not become ready again after Kafka returned")


async def _upload(client: httpx.AsyncClient, headers: dict[str, str], count: int) -> httpx.Response:
    files = [("file", (f"i{i}.dcm", mr_instance()[0], "application/dicom")) for i in range(count)]
    return await client.post(f"{GATEWAY}/api/v1/imaging/upload", files=files, headers=headers)


@pytest.mark.slow
async def test_kafka_outage_answers_503_and_loses_nothing_acknowledged():
    tenant = new_tenant("it-kafka")
    headers = bearer("it-kafka-pacs", tenant, "uploader")
    kill_hard("ingest")
    restart("ingest")
    async with httpx.AsyncClient(timeout=120) as client:
        acknowledged = await _upload(client, headers, 3)
        assert acknowledged.status_code == 200, acknowledged.text
        imaging_ids = [a["imaging_id"] for a in acknowledged.json()["accepted"]]
        kill_hard("kafka")  # right after the acknowledgement: ingest has likely not consumed it yet
        try:
            # Both wait for the publish timeout before answering: sent together, they wait once.
            refused, stow = await asyncio.gather(
                _upload(client, headers, 2),
                client.post(
                    f"{GATEWAY}/dicomweb/studies",
                    content=mr_instance()[0],
                    headers={**headers, "Content-Type": "application/dicom"},
                ),
            )
            assert refused.status_code == 503, refused.text
            assert refused.headers.get("retry-after")
            body = refused.json()
            assert "imaging_id" not in refused.text and "accepted" not in body
            assert "retry later" in refused.text
            assert stow.status_code == 503 and "ReferencedSOPSequence" not in stow.text
            assert (await client.get(f"{GATEWAY}/healthz")).status_code == 200  # alive, just not ready
            assert (await client.get(f"{GATEWAY}/readyz")).status_code == 503
        finally:
            restart("kafka")
            await _wait_ready(client)
        for imaging_id in imaging_ids:
            await wait_for_status(
                client, f"{GATEWAY}/api/v1/imaging/{imaging_id}", headers, STORED_OR_BEYOND, timeout=180
            )
        after = await _upload(client, headers, 1)
        assert after.status_code == 200, after.text
