"""The bound on uploads one gateway receives at once (``ENCLAVE_GATEWAY_MAX_CONCURRENT_UPLOADS``), on a
gateway process of its own with a limit of one.

While one upload is still sending its body, a second is answered 503 ``too_many_uploads`` with
``Retry-After`` and a body saying what the limit is, before its body is read: the client (httpx,
which reads the answer once it has sent the body) gets that answer whole, the access trail records
the upload as rejected, and nothing of it reaches the upload topics. A caller without a token still
gets 401, and the other routes answer as usual. Once the first upload ends, its slot takes the next.
"""

from __future__ import annotations

import asyncio
import re
import uuid

import httpx
import pytest
from enclave_common import topics

from .support import mr_instance
from .test_gateway_support import TopicWatch, bearer, builders, gateway_process, new_tenant

UPLOAD_TOPICS = (topics.UPLOAD_CHUNK, topics.UPLOAD_RECEIVED, topics.UPLOAD_COMPLETED)


@pytest.fixture(scope="module")
def one_slot_gateway(tmp_path_factory: pytest.TempPathFactory):
    overrides = {"ENCLAVE_GATEWAY_MAX_CONCURRENT_UPLOADS": "1"}
    with gateway_process(tmp_path_factory.mktemp("gw-slots"), overrides) as gateway:
        yield gateway


def _metric(text: str, name: str, labels: str = "") -> float:
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name}{labels} is not on /metrics"
    return float(found.group(1))


async def test_past_the_limit_an_upload_is_a_503_before_its_body_and_the_slot_takes_the_next(
    one_slot_gateway,
) -> None:
    url, port = one_slot_gateway.url, one_slot_gateway.port
    tenant = new_tenant("it-slots")
    uploader = bearer("it-slots-pacs", tenant, "uploader")
    held_body = builders.multipart_body([mr_instance()[0]])
    refused_id = str(uuid.uuid4())

    async with TopicWatch(topics.ACCESS_RECORDED, *UPLOAD_TOPICS) as watch:
        # The first upload: its head and half its body, then it waits (a slow PACS still sending).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        half = len(held_body.data) // 2
        writer.write(
            (
                f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: {uploader['Authorization']}\r\n"
                f"Content-Type: {held_body.content_type}\r\nContent-Length: {len(held_body.data)}\r\n\r\n"
            ).encode()
            + held_body.data[:half]
        )
        await writer.drain()
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(100):
                metrics = (await client.get(f"{url}/metrics")).text
                if _metric(metrics, "enclave_gateway_uploads_in_progress") == 1:
                    break
                await asyncio.sleep(0.1)
            assert _metric(metrics, "enclave_gateway_max_concurrent_uploads") == 1

            # The second: 4 MiB declared and sent; refused before any of it is read.
            large = builders.multipart_body([mr_instance()[0], b"\0" * (4 << 20)])
            refused = await client.post(
                f"{url}/dicomweb/studies",
                content=large.data,
                headers={**uploader, "Content-Type": large.content_type, "X-Request-ID": refused_id},
            )
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "10"
            body = refused.json()
            assert body["error"] == "too_many_uploads" and body["status"] == 503
            assert "ENCLAVE_GATEWAY_MAX_CONCURRENT_UPLOADS=1" in body["message"]
            assert "nothing of this upload was read or kept" in body["message"]

            anonymous = await client.post(
                f"{url}/dicomweb/studies", content=b"x", headers={"Content-Type": "application/dicom"}
            )
            assert anonymous.status_code == 401  # decided before the slot: no token, no upload
            assert (await client.get(f"{url}/healthz")).status_code == 200
            assert (await client.get(f"{url}/readyz")).status_code == 200

            # The first upload ends; its slot takes the next one.
            writer.write(held_body.data[half:])
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 30)
            writer.close()
            await writer.wait_closed()
            assert status_line.startswith(b"HTTP/1.1 200"), status_line
            instance, _ = mr_instance()
            after = await client.post(
                f"{url}/dicomweb/studies",
                content=instance,
                headers={**uploader, "Content-Type": "application/dicom"},
            )
            assert after.status_code == 200, after.text
            metrics = (await client.get(f"{url}/metrics")).text
        assert _metric(metrics, "enclave_gateway_uploads_in_progress") == 0
        assert _metric(metrics, "enclave_gateway_uploads_refused_total", '{reason="too_many_uploads"}') == 1
        events = await watch.read(lambda e: e.tenant == tenant)

    access = [e.data for e in events if e.correlation_id == refused_id]
    assert [(a["outcome"], a["status_code"], a["detail"]) for a in access] == [
        ("rejected", 503, "too_many_uploads"),  # its answer only (until the nineteenth session the
    ]  # allowed decision came first, as success 200)
    received = [e for e in events if e.type == topics.event_type(topics.UPLOAD_RECEIVED)]
    assert len(received) == 2, "the held upload and the one after it; nothing of the refused one"
