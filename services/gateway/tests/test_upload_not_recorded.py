"""An upload whose read-model record the database did not take (it did not answer) is refused like
a Kafka outage: ``UploadNotRecorded`` (503 ``database_unavailable``), ``upload.completed`` is not
published, the sealed spool is released, and the message says what a retry does. Any other failure
of the write is not turned into a 503."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from enclave_common import topics
from enclave_common.crypto import Pseudonymizer
from enclave_common.envelope import Envelope
from enclave_gateway.handoff import Handoff
from enclave_gateway.multipart import BodyLimits
from enclave_gateway.uploads import BodyPace, UploadNotRecorded, UploadProcessor
from enclave_gateway.validation import ValidationPolicy
from pydicom.data import get_testdata_file
from pymongo.errors import AutoReconnect, WriteError

PLANTED = "PHI-MRN-81442-TQ"


class AckingPublisher:
    """DirectPublisher.send: every event is acknowledged at once; the topics are kept."""

    def __init__(self) -> None:
        self.topics: list[str] = []

    async def send(self, topic: str, envelope: Envelope, *, key: str) -> asyncio.Future[Any]:
        self.topics.append(topic)
        ack: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack


class FailingReadModel:
    def __init__(self, failure: Exception) -> None:
        self.failure = failure

    async def record_uploads(self, tenant: str, upload_id: str, instances: list[Any]) -> None:
        await asyncio.sleep(0.01)  # answers after Kafka acknowledged the hand-off, like a slow database
        raise self.failure


def instance_bytes() -> bytes:
    dataset = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    dataset.PatientID = PLANTED
    out = BytesIO()
    dataset.save_as(out, enforce_file_format=True)
    return out.getvalue()


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


def processor(tmp_path: Path, publisher: AckingPublisher, read_model: FailingReadModel) -> UploadProcessor:
    return UploadProcessor(
        recipient=X25519PrivateKey.generate().public_key(),
        pseudonymizer=Pseudonymizer(bytes(32)),
        handoff=Handoff(publisher, timeout_s=5),  # type: ignore[arg-type]
        read_model=read_model,  # type: ignore[arg-type]
        limits=BodyLimits(max_parts=10, max_instance_bytes=1 << 24, max_request_bytes=1 << 26),
        policy=ValidationPolicy(),
        spool_dir=tmp_path,
        chunk_bytes=1 << 20,
        pace=BodyPace(idle_timeout_s=5),
        spool_memory_bytes=1 << 26,
    )


async def test_a_database_that_did_not_answer_refuses_the_upload_and_publishes_no_completion(
    tmp_path: Path,
) -> None:
    publisher = AckingPublisher()
    uploads = processor(tmp_path, publisher, FailingReadModel(AutoReconnect(f"lost {PLANTED}")))
    result = await uploads.receive("application/dicom", body(instance_bytes()), tenant="hospital-a")
    assert len(result.accepted) == 1
    with pytest.raises(UploadNotRecorded) as refused:
        await uploads.publish(result, tenant="hospital-a", actor="pacs-1")
    assert refused.value.code == "database_unavailable"
    message = str(refused.value)
    assert "retry later" in message and "recognised by ingest as a duplicate" in message
    assert PLANTED not in message
    assert topics.UPLOAD_RECEIVED in publisher.topics  # the hand-off was acknowledged before
    assert topics.UPLOAD_COMPLETED not in publisher.topics
    assert result.accepted[0].sealed.discarded  # the sealed copy is released


async def test_a_write_the_database_refused_is_not_turned_into_a_503(tmp_path: Path) -> None:
    publisher = AckingPublisher()
    uploads = processor(tmp_path, publisher, FailingReadModel(WriteError("refused", code=2)))
    result = await uploads.receive("application/dicom", body(instance_bytes()), tenant="hospital-a")
    with pytest.raises(WriteError):
        await uploads.publish(result, tenant="hospital-a", actor="pacs-1")
    assert topics.UPLOAD_COMPLETED not in publisher.topics
