"""A compressed series whose codestreams declare a far larger image than its attributes, through the
whole system: the gateway, ingest and de-identification keep the JPEG 2000 codestream as it is, and
analysis refuses the series from the codestream headers, before it decodes a frame
(``pixel_data_unreadable``, naming what the codestream declares and what the attributes allow).

Before the eighteenth session the frames were decoded first: a JPEG 2000 decoder allocated the
8192x8192 image each declares (+394 MiB per frame in pydicom, from 8 KB on the wire), and only its
output was found not to fit the 64x64 frame."""

from __future__ import annotations

import io
import struct

import httpx
from enclave_common import topics
from enclave_common.events import AnalysisFailed
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

from .support import mr_instance, wait_for_events
from .test_gateway_support import GATEWAY, bearer, new_tenant


def _slice_declaring_8192_squared(study: str, series: str, k: int) -> bytes:
    """pydicom's 64x64 JPEG 2000 MR slice at position k of a stack, its SIZ segment saying 8192x8192."""
    _, ds = mr_instance(study_uid=study, series_uid=series, source="MR_small_jp2klossless.dcm")
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 5.0 * k]
    codestream = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    assert codestream[:4] == b"\xff\x4f\xff\x51"  # SOC, SIZ
    struct.pack_into(">IIIIII", codestream, 8, 8192, 8192, 0, 0, 8192, 8192)  # Xsiz .. YTsiz
    ds.PixelData = encapsulate([bytes(codestream)])
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


async def test_a_jpeg_2000_series_declaring_a_larger_image_is_refused_from_its_codestream_headers():
    tenant = new_tenant("it-j2k")
    headers = bearer("it-j2k-pacs", tenant, "uploader")
    study, series = generate_uid(), generate_uid()
    files = [
        ("file", (f"{k}.dcm", _slice_declaring_8192_squared(study, series, k), "application/dicom"))
        for k in range(3)
    ]
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.post(f"{GATEWAY}/api/v1/imaging/upload", files=files, headers=headers)
    assert answer.status_code == 200, answer.text
    ids = sorted(a["imaging_id"] for a in answer.json()["accepted"])
    assert len(ids) == 3

    (failed,) = await wait_for_events(topics.ANALYSIS_FAILED, lambda e: e.tenant == tenant, timeout=180)
    outcome = failed.payload(AnalysisFailed)
    assert sorted(outcome.instance_upload_ids) == ids
    assert outcome.reason_code == "pixel_data_unreadable"
    assert "cannot be decoded: frame 0 is JPEG 2000 Image Compression (Lossless Only) data declaring " in (
        outcome.reason
    )
    assert outcome.reason.endswith(
        "declaring 8192x8192 pixels of 1 sample(s) in its codestream, where Rows x Columns is 64x64 of 1 "
        "(SamplesPerPixel); the codestream must declare the image its attributes describe"
    )
