"""A real brain through the whole system, the way a hospital would send it.

nilearn's MNI152 2009a T1 is written out as a DICOM MR series (one file per slice, realistic headers
with planted PHI), posted to the gateway with the Python dicomweb-client (STOW-RS), and followed
through ingest, de-identification and analysis to the results API. The numbers are checked against
the template's own probability maps, the reports are fetched and opened, and the audit trail holds
the causal chain of the upload.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid

import httpx
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from enclave_analysis.atlas import mni_template
from enclave_analysis.phantoms import mni152_volume, write_mr_series
from enclave_common.auth.dev_issuer import DevIssuer  # noqa: F401 - the CLI is used, as a user would
from enclave_common.crypto import LocalKeyring, ObjectIdentity, decrypt_bytes
from enclave_common.settings import BaseServiceSettings
from enclave_common.storage import S3ObjectStore

from .conftest import S3_ENDPOINT, S3_KEY, S3_SECRET, SERVICE_PORTS
from .support import PHI, ROOT, dev_env

GATEWAY = "http://127.0.0.1:8080"
TENANT = "hospital-brain-it"


def _token(sub: str, roles: str) -> str:
    import subprocess

    return subprocess.run(
        [str(ROOT / ".venv/bin/python"), str(ROOT / "scripts/dev_issuer.py"), "token", "--dir", str(ROOT / ".state/keys"),
         "--sub", sub, "--tenant", TENANT, "--roles", roles, "--ttl", "3600"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


def _crypto_operations() -> dict[tuple[str, str], float]:
    """``enclave_crypto_operations_total`` of ingest, deid and analysis, by (service, operation)."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[tuple[str, str], float] = {}
    for service in ("ingest", "deid", "analysis"):
        text = httpx.get(f"http://127.0.0.1:{SERVICE_PORTS[service]}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "enclave_crypto_operations_total":
                    counts[(sample.labels["service"], sample.labels["operation"])] = sample.value
    return counts


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mni_brain_series_is_analysed_end_to_end():
    patient_id = f"{PHI['PatientID']}-{uuid.uuid4().hex[:6]}"  # one patient per run
    datasets = write_mr_series(
        mni152_volume(),
        patient_name=PHI["PatientName"],
        patient_id=patient_id,
        series_description="T1 MPRAGE",
    )
    crypto_before = _crypto_operations()
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {_token('pacs-brain', 'uploader')}"
    client = DICOMwebClient(url=f"{GATEWAY}/dicomweb", session=session)
    for start in range(0, len(datasets), 50):  # a PACS sends big series in batches
        response = client.store_instances(datasets[start : start + 50])
        assert len(response.ReferencedSOPSequence) == len(datasets[start : start + 50])

    clinician = {"Authorization": f"Bearer {_token('dr-brain', 'clinician')}"}
    patient = httpx.get(
        f"{GATEWAY}/api/v1/imaging/patient/{patient_id}", headers=clinician, timeout=30
    ).json()
    imaging_ids = [i["imaging_id"] for i in patient["instances"]]
    assert len(imaging_ids) == len(datasets)

    deadline = time.monotonic() + 600
    result = None
    while time.monotonic() < deadline:
        reply = httpx.get(
            f"{GATEWAY}/api/v1/imaging/{imaging_ids[0]}/analysis", headers=clinician, timeout=30
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        if body.get("status") in ("completed", "failed"):
            result = body
            break
        time.sleep(5)
    assert result is not None, "no analysis result within 10 minutes"
    assert result["status"] == "completed", result

    template = mni_template()
    voxel_ml = float(abs(np.linalg.det(template.affine_ras[:3, :3]))) / 1000.0
    gm_reference = float(template.gm.sum(dtype=np.float64)) * voxel_ml
    wm_reference = float(template.wm.sum(dtype=np.float64)) * voxel_ml
    measures = result["measures"]
    assert measures["grey_matter_volume"] == pytest.approx(gm_reference, rel=0.05)
    assert measures["white_matter_volume"] == pytest.approx(wm_reference, rel=0.05)
    # the seed's field names, and a verdict
    assert result["hippocampal_volume_total"] is not None and 4.0 < result["hippocampal_volume_total"] < 12.0
    # plausibility only (precision is proven on phantoms of known thickness in the unit tests): the
    # template is an average of many brains, its cortex is blurred, and the distance method
    # overestimates in buried sulci (docs/analysis.md reports 4.7 mm for it)
    assert result["cortical_thickness_mean"] is not None and 1.5 < result["cortical_thickness_mean"] < 6.0
    assert result["qc"]["verdict"] in ("pass", "warn")
    # the volume the measures were computed on: the template's own 1 mm matrix (8.7 M voxels, within
    # the voxel budget), not reduced in-plane
    assert result["qc"]["in_plane_reduction"] == 1
    assert result["qc"]["analysed_shape"] == [197, 233, 189]
    assert result["qc"]["analysed_voxel_size_mm"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-3)

    # every encryption and decryption of the series shows in the services' crypto counters
    crypto = _crypto_operations()
    done = {key: crypto.get(key, 0.0) - crypto_before.get(key, 0.0) for key in crypto}
    n = len(datasets)
    assert done[("ingest", "unseal")] >= n and done[("ingest", "encrypt")] >= n
    assert done[("deid", "decrypt")] >= n and done[("deid", "encrypt")] >= n
    assert done[("analysis", "decrypt")] >= n and done[("analysis", "encrypt")] >= 3  # SR, SEG, PNG

    # every instance of the series reached "analysed"
    statuses = {
        httpx.get(f"{GATEWAY}/api/v1/imaging/{i}", headers=clinician, timeout=30).json()["status"]
        for i in imaging_ids[:10]
    }
    assert statuses == {"analysed"}

    # the reports are stored encrypted in the de-identified key domain and open as what they claim to be
    reports = {ref["key"].rsplit("/", 1)[-1]: ref for ref in result["reports"]}
    assert set(reports) == {"measurements-sr.dcm", "segmentation.dcm", "report.png"}
    store = S3ObjectStore(
        BaseServiceSettings(
            s3_endpoint_url=S3_ENDPOINT, s3_access_key_id=S3_KEY, s3_secret_access_key=S3_SECRET
        )
    )
    keyring = LocalKeyring.load(dev_env()["ENCLAVE_ANALYSIS_KEYRING_FILE"])
    study_key = patient["instances"][0]["study_key"]

    async def fetch(name: str) -> bytes:
        ref = reports[name]
        blob = await store.read(ref["bucket"], ref["key"], ref.get("version_id"))
        return decrypt_bytes(blob, ObjectIdentity(TENANT, study_key, ref["key"]), keyring)

    sr = pydicom.dcmread(io.BytesIO(asyncio.run(fetch("measurements-sr.dcm"))))
    seg = pydicom.dcmread(io.BytesIO(asyncio.run(fetch("segmentation.dcm"))))
    png = asyncio.run(fetch("report.png"))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR (TID 1500 container)
    assert "in-plane reduction: 1 (none)" in sr.to_json()  # TID 4019 Algorithm Parameters
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for report in (sr, seg):
        text = report.to_json()
        for value in PHI.values():
            assert value not in text, "a report derived from de-identified data must not carry PHI"
