"""Ingest's own check of what reaches it, on the real stack: an instance whose required attribute has
another VR than the standard's (which the gateway now refuses, so it is forged here as chunks the
gateway would have published) ends as ``invalid_instance`` with a reason that names the attribute.

Found by a conformance review: a SeriesInstanceUID written as FD failed while pydicom converted its
value, outside ingest's error handling, and the hospital saw ``unexpected_error`` with a stack
location (``raised at hooks.py:256 ... dicom_check.py:58``) for a reason.
"""

from __future__ import annotations

from enclave_common import topics
from enclave_common.envelope import new_event_id
from enclave_common.events import InstanceRejected

from .support import PHI, mr_instance, publish, sealed_chunk_envelopes, wait_for_events
from .test_gateway_support import builders

TENANT = "hospital-it-ingest-vr"


async def test_a_required_uid_under_another_vr_is_an_invalid_instance_not_an_unexpected_error():
    # six bytes: no whole FD value, so pydicom cannot convert it (the review's value)
    data = builders.with_element_vr(mr_instance(series_uid="1.2.34")[0], 0x0020000E, b"FD")
    envelopes = sealed_chunk_envelopes(data, tenant=TENANT, upload_id=new_event_id())
    instance_upload_id = envelopes[0].data["instance_upload_id"]
    await publish(topics.UPLOAD_CHUNK, envelopes, key=instance_upload_id)
    (event,) = await wait_for_events(
        (topics.INSTANCE_STORED, topics.INSTANCE_REJECTED),
        lambda env: env.data.get("instance_upload_id") == instance_upload_id,
    )
    assert event.type == topics.event_type(topics.INSTANCE_REJECTED), event.data
    rejected = event.payload(InstanceRejected)
    assert rejected.reason_code == "invalid_instance"
    assert rejected.reason == "SeriesInstanceUID (0020,000E) has VR FD; it must be UI"
    text = event.to_bytes().decode()
    for value in PHI.values():
        assert value not in text
