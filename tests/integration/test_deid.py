"""De-identification on the real stack: the real ingest stores PHI-bearing instances (this test acts as the
gateway on the bus), the real deid service de-identifies them; the test opens the copies with the deid
keyring alone (what the analysis service holds) and checks every effect."""

from __future__ import annotations

import asyncio
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pydicom
import pytest
from enclave_common import topics
from enclave_common.crypto import LocalKeyring, ObjectHeader, ObjectIdentity, decrypt_bytes
from enclave_common.envelope import Envelope, derived_event_id, new_event_id
from enclave_common.events import AccessRecorded, InstanceDeidentified, InstanceQuarantined
from enclave_common.settings import BaseServiceSettings
from enclave_common.storage import S3ObjectStore
from pydicom.uid import generate_uid

from .conftest import MONGO_URL, S3_ENDPOINT, S3_KEY, S3_SECRET, SERVICE_PORTS
from .support import (
    PHI,
    ROOT,
    STATE,
    admin_command,
    dev_env,
    mr_instance,
    publish,
    read_all,
    restarted_with,
    sealed_chunk_envelopes,
    service_identity,
    wait_for_events,
)
from .test_gateway_support import bearer

sys.path.insert(0, str(ROOT / "services/deid/tests"))
from deid_leakscan import find_leaks  # noqa: E402
from enclave_deid.policy import DeidPolicy  # noqa: E402

TENANT = "hospital-it-deid"
DEID_BUCKET = "enclave-deidentified"
#: The service's default policy (no ENCLAVE_DEID_TENANT_POLICIES entry for the test tenant).
DEFAULT_POLICY = DeidPolicy(retain_longitudinal_modified_dates=True)
#: Real-world files of pydicom-data: a Siemens MR with private CSA headers and overlays, JPEG 2000 MR and
#: CT (encapsulated pixel data), a big-endian MR, a segmentation with references in sequences.
CORPUS = (
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
    "MR2_J2KR.dcm",
    "693_J2KR.dcm",
    "emri_small_big_endian.dcm",
    "liver.dcm",
)


def _store() -> S3ObjectStore:
    return S3ObjectStore(
        BaseServiceSettings(
            s3_endpoint_url=S3_ENDPOINT, s3_access_key_id=S3_KEY, s3_secret_access_key=S3_SECRET
        )
    )


def _pydicom_data_file(name: str) -> Path:
    for entry in importlib.metadata.files("pydicom-data") or []:
        if str(entry).startswith("data_store/data/") and Path(str(entry)).name == name:
            return Path(str(entry.locate()))
    raise LookupError(name)


def _with_planted_phi(path: Path, patient_id: str = PHI["PatientID"]) -> tuple[bytes, pydicom.Dataset]:
    """A corpus file with the planted PHI added (its own identifiers stay too) and fresh UIDs."""
    ds = pydicom.dcmread(path)
    for name, value in PHI.items():
        setattr(ds, name, value)
    ds.PatientID = patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), pydicom.dcmread(io.BytesIO(out.getvalue()))


def _phi_needles(original: pydicom.Dataset) -> set[bytes]:
    """The planted values, their name components and the original UIDs, raw and in the file's character set."""
    values = (
        set(PHI.values()) | set(PHI["PatientName"].split("^")) | set(PHI["ReferringPhysicianName"].split("^"))
    )
    values |= {str(original.StudyInstanceUID), str(original.SeriesInstanceUID), str(original.SOPInstanceUID)}
    encodings = pydicom.charset.convert_encodings(original.get("SpecificCharacterSet") or "ISO_IR 6")
    needles = {v.encode() for v in values if len(v) >= 4}
    needles |= {pydicom.charset.encode_string(v, encodings) for v in values if len(v) >= 4}
    return needles


async def _send(data: bytes, tenant: str = TENANT) -> str:
    envs = sealed_chunk_envelopes(data, tenant=tenant, upload_id=new_event_id())
    iuid = envs[0].data["instance_upload_id"]
    await publish(topics.UPLOAD_CHUNK, envs, key=iuid)
    return iuid


def _for(iuid: str):
    return lambda env: env.data.get("instance_upload_id") == iuid


async def _deidentified(iuid: str, timeout: float = 90.0) -> Envelope:
    (event,) = await wait_for_events(topics.INSTANCE_DEIDENTIFIED, _for(iuid), timeout=timeout)
    return event


async def _open_copy(event: Envelope) -> tuple[bytes, bytes]:
    """(ciphertext, plaintext) of a de-identified copy, opened with the deid keyring the analysis service holds."""
    released = event.payload(InstanceDeidentified)
    ref = released.object
    blob = await _store().read(ref.bucket, ref.key, ref.version_id)
    keyring = LocalKeyring.load(dev_env()["ENCLAVE_ANALYSIS_KEYRING_FILE"])
    identity = ObjectIdentity(event.tenant, released.study_key, ref.key)
    return blob, decrypt_bytes(blob, identity, keyring)


def _dcmdump(data: bytes) -> subprocess.CompletedProcess[str]:
    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        handle.write(data)
        handle.flush()
        return subprocess.run(["dcmdump", "-q", handle.name], capture_output=True, text=True, timeout=60)


def _assert_released(event: Envelope, original: pydicom.Dataset, ciphertext: bytes, plaintext: bytes) -> None:
    released = event.payload(InstanceDeidentified)
    needles = _phi_needles(original)
    for needle in needles:
        assert needle not in ciphertext
        assert needle not in plaintext, "a planted identifier is in the de-identified copy"
    assert find_leaks(original, plaintext, DEFAULT_POLICY) == []
    text = event.to_bytes()
    assert not [n for n in needles if n in text], "the event carries an identifier"
    output = pydicom.dcmread(io.BytesIO(plaintext))
    assert output.PatientIdentityRemoved == "YES"
    assert output.PatientID == output.PatientName == released.patient_pseudonym
    assert output.StudyInstanceUID == released.deid_study_uid
    assert output.SeriesInstanceUID == released.deid_series_uid
    assert output.SOPInstanceUID == output.file_meta.MediaStorageSOPInstanceUID == released.deid_instance_uid
    for uid in (released.deid_study_uid, released.deid_series_uid, released.deid_instance_uid):
        assert re.fullmatch(r"2\.25\.[1-9]\d*", uid)
    assert output.SOPClassUID == original.SOPClassUID
    assert output.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert output.get_item("PixelData").value == original.get_item("PixelData").value
    assert released.options == ["retain_longitudinal_modified_dates"]
    assert re.fullmatch(r"deidentified/[0-9a-f-]{36}", released.object.key)
    dump = _dcmdump(plaintext)
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr


async def test_mr_instance_with_planted_phi_is_released_clean():
    data, original = mr_instance()
    iuid = await _send(data)
    event = await _deidentified(iuid)
    ciphertext, plaintext = await _open_copy(event)
    _assert_released(event, original, ciphertext, plaintext)
    released = event.payload(InstanceDeidentified)
    (stored,) = await wait_for_events(topics.INSTANCE_STORED, _for(iuid))
    assert (
        released.study_key == stored.data["study_key"]
        and released.instance_key == stored.data["instance_key"]
    )
    assert event.causation_id == stored.id and event.correlation_id == stored.correlation_id


@pytest.mark.parametrize("name", CORPUS)
async def test_real_world_files_are_released_clean(name: str):
    data, original = _with_planted_phi(_pydicom_data_file(name))
    event = await _deidentified(await _send(data))
    ciphertext, plaintext = await _open_copy(event)
    _assert_released(event, original, ciphertext, plaintext)
    assert not [e for e in pydicom.dcmread(io.BytesIO(plaintext)) if e.tag.is_private]


async def test_same_patient_same_pseudonym_and_date_shift_other_tenant_differs():
    patient = f"PHI-MRN-{new_event_id()[-8:]}"
    first, first_ds = mr_instance(patient_id=patient)
    second, second_ds = mr_instance(patient_id=patient)
    other, _ = mr_instance(patient_id=patient)
    iuids = [await _send(first), await _send(second), await _send(other, tenant=TENANT + "-other")]
    events = [await _deidentified(iuid) for iuid in iuids]
    pseudonyms = [e.payload(InstanceDeidentified).patient_pseudonym for e in events]
    assert pseudonyms[0] == pseudonyms[1] != pseudonyms[2]
    shifts = []
    for event, original in zip(events[:2], (first_ds, second_ds), strict=True):
        output = pydicom.dcmread(io.BytesIO((await _open_copy(event))[1]))
        assert output.StudyDate != original.StudyDate
        shifts.append(pydicom.valuerep.DA(output.StudyDate) - pydicom.valuerep.DA(original.StudyDate))
    assert shifts[0] == shifts[1] and shifts[0].days < 0


async def test_duplicate_upload_and_redelivery_make_no_second_copy(mongo):
    data, _ = mr_instance()
    first = await _send(data)
    event = await _deidentified(first)
    again = await _send(data)
    (stored_again,) = await wait_for_events(topics.INSTANCE_STORED, _for(again))
    assert stored_again.data["duplicate"] == "duplicate"
    reemitted = await _deidentified(again)
    assert reemitted.payload(InstanceDeidentified).object == event.payload(InstanceDeidentified).object
    assert reemitted.id == derived_event_id(stored_again.id, "enclave.instance.deidentified", again)
    # a redelivery of the first instance.stored event: the same outcome id, nothing stored again
    (stored_first,) = await wait_for_events(topics.INSTANCE_STORED, _for(first))
    await publish(topics.INSTANCE_STORED, [stored_first], key=first)
    await asyncio.sleep(3)
    outcomes = await read_all(topics.INSTANCE_DEIDENTIFIED, _for(first))
    assert {e.id for e in outcomes} == {event.id}
    instance_key = stored_first.data["instance_key"]
    records = [
        d async for d in mongo["deid"]["deidentified"].find({"tenant": TENANT, "instance_key": instance_key})
    ]
    assert len(records) == 1 and records[0]["status"] == "deidentified"
    key = event.payload(InstanceDeidentified).object.key
    versions = _store()._client.list_object_versions(Bucket=DEID_BUCKET, Prefix=key).get("Versions", [])
    assert len(versions) == 1


async def test_burned_in_annotation_is_quarantined_and_nothing_is_stored(mongo):
    data, ds = mr_instance()
    ds.BurnedInAnnotation = "YES"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    iuid = await _send(out.getvalue())
    (event,) = await wait_for_events(topics.INSTANCE_QUARANTINED, _for(iuid), timeout=90)
    quarantined = event.payload(InstanceQuarantined)
    assert quarantined.reason_code == "burned_in_risk" and "BurnedInAnnotation" in quarantined.reason
    (stored,) = await wait_for_events(topics.INSTANCE_STORED, _for(iuid))
    # the key a release would have used is derived from the cause: nothing is there
    would_be = f"deidentified/{derived_event_id(stored.id, 'deid.object', stored.data['instance_key'])}"
    assert not await _store().exists(DEID_BUCKET, would_be)
    assert await read_all(topics.INSTANCE_DEIDENTIFIED, _for(iuid), settle=1.0) == []
    record = await mongo["deid"]["deidentified"].find_one(
        {"tenant": TENANT, "instance_key": stored.data["instance_key"]}
    )
    assert record["status"] == "quarantined" and "object" not in record
    assert (
        await mongo["deid"]["linkage"].find_one(
            {"tenant": TENANT, "instance_key": stored.data["instance_key"]}
        )
        is None
    )


async def test_an_instance_deid_cannot_handle_is_quarantined_with_its_reason_not_dead_lettered(mongo):
    """An instance that deid cannot de-identify (here: larger than ENCLAVE_DEID_MAX_INSTANCE_BYTES,
    set very low for this test; an unparseable or unsupported instance takes the same path) is
    quarantined with the code and reason, a recorded outcome its status and its series can end on.
    Before the ninth session it was only dead-lettered: its status stayed "stored" for good and its
    series never came to an analysis."""
    with restarted_with("deid", {"ENCLAVE_DEID_MAX_INSTANCE_BYTES": "4096"}):
        data, _ = mr_instance()
        assert len(data) > 4096
        iuid = await _send(data)
        (event,) = await wait_for_events(topics.INSTANCE_QUARANTINED, _for(iuid), timeout=120)
        quarantined = event.payload(InstanceQuarantined)
        assert quarantined.reason_code == "instance_too_large"
        assert "ENCLAVE_DEID_MAX_INSTANCE_BYTES" in quarantined.reason
        (stored,) = await wait_for_events(topics.INSTANCE_STORED, _for(iuid))
        record = await mongo["deid"]["deidentified"].find_one(
            {"tenant": TENANT, "instance_key": stored.data["instance_key"]}
        )
        assert record["status"] == "quarantined" and "object" not in record
        assert await read_all(topics.dlq(topics.INSTANCE_STORED), _for(iuid), settle=1.0) == []


def _linkage_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return admin_command("enclave-deid-linkage", *args)


async def test_break_glass_reads_linkage_only_with_justification_and_is_audited(mongo):
    data, original = mr_instance()
    iuid = await _send(data)
    event = await _deidentified(iuid)
    (stored,) = await wait_for_events(topics.INSTANCE_STORED, _for(iuid))
    patient_key = stored.data["patient_key"]
    released = event.payload(InstanceDeidentified)
    pseudonym = released.patient_pseudonym
    assert released.patient_key == patient_key  # one key finds the patient's trail (below)
    stored_linkage = [
        d async for d in mongo["deid"]["linkage"].find({"tenant": TENANT, "patient_pseudonym": pseudonym})
    ]
    assert stored_linkage and not [n for n in _phi_needles(original) if n in repr(stored_linkage).encode()]
    mine = next(d for d in stored_linkage if d["instance_key"] == stored.data["instance_key"])
    assert mine["patient_key"] == patient_key
    actor = f"user:dr-it-{new_event_id()[-6:]}"
    base = ["--tenant", TENANT, "--pseudonym", pseudonym, "--actor", actor, "--role", "clinician"]
    refused = _linkage_cli(*base, "--justification", "because")
    assert refused.returncode == 2 and PHI["PatientID"] not in refused.stdout + refused.stderr
    done = _linkage_cli(*base, "--justification", "Emergency: re-contact for an incidental finding")
    assert done.returncode == 0, done.stderr
    disclosure = json.loads(done.stdout)
    assert {r["patient_id"] for r in disclosure["records"]} == {PHI["PatientID"]}
    assert str(original.StudyInstanceUID) in {
        uid for r in disclosure["records"] for uid in r["uids"].values()
    }
    (access,) = await wait_for_events(topics.ACCESS_RECORDED, lambda e: e.actor == actor)
    recorded = access.payload(AccessRecorded)
    assert recorded.action == "break_glass_linkage" and recorded.outcome == "success"
    # Records stored before the sixteenth session carry no patient key: every key here is this one.
    assert recorded.target == f"patient_pseudonym:{pseudonym}/patient:{patient_key}"
    assert "incidental finding" in (recorded.detail or "")
    assert access.correlation_id == disclosure["session_id"] and access.tenant == TENANT
    (alert,) = await wait_for_events(topics.SECURITY_ALERT, lambda e: e.actor == actor)
    assert alert.data["rule"] == "break_glass" and alert.data["subject"] == actor
    assert alert.correlation_id == disclosure["session_id"]

    # The auditor's accounting of disclosures: the patient key the gateway answers with finds the
    # break-glass read and the de-identification, not only the upload (before: only the upload).
    auditor = bearer(f"it-auditor-{new_event_id()[-6:]}", "enclave-operator", "auditor")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{SERVICE_PORTS['audit']}") as client:
        found: dict[str, str] = {}
        for _ in range(60):
            page = await client.get(
                "/audit/events", params={"patient": patient_key, "limit": 1000}, headers=auditor
            )
            assert page.status_code == 200, page.text
            found = {r["event_id"]: r["topic"] for r in page.json()["records"]}
            if event.id in found and access.id in found:
                break
            await asyncio.sleep(0.5)
    assert found.get(event.id) == topics.INSTANCE_DEIDENTIFIED and access.id in found


async def test_deid_log_is_free_of_planted_phi():
    log = (STATE / "logs" / "deid.log").read_bytes()
    assert b"instance deidentified" in log
    values = (
        set(PHI.values()) | set(PHI["PatientName"].split("^")) | set(PHI["ReferringPhysicianName"].split("^"))
    )
    assert [v for v in values if v.encode() in log] == []


async def test_crypto_shredding_a_study_erases_its_linkage(mongo):
    """After `enclave-ingest-keys shred`, break-glass can no longer disclose that study's identifiers;
    another study of the same patient keeps its linkage."""
    shredded_data, _ = mr_instance()
    kept_data, _ = mr_instance()
    shredded = (await _deidentified(await _send(shredded_data))).payload(InstanceDeidentified)
    kept = (await _deidentified(await _send(kept_data))).payload(InstanceDeidentified)
    assert shredded.patient_pseudonym == kept.patient_pseudonym and shredded.study_key != kept.study_key
    linkage = mongo["deid"]["linkage"]
    doc = await linkage.find_one({"_id": f"{TENANT}|{shredded.instance_key}"})
    assert doc is not None and doc["study_key"] == shredded.study_key
    env = {**os.environ, **dev_env(), **service_identity("ingest"), "ENCLAVE_MONGO_URL": MONGO_URL}

    def shred() -> str:
        done = subprocess.run(
            [str(ROOT / ".venv/bin/enclave-ingest-keys"), "--actor", "it-admin", "shred", "--tenant", TENANT]
            + ["--study-key", shredded.study_key, "--reason", "erasure request"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert shred().strip() == "shredded"
    for _ in range(120):
        if await linkage.find_one({"_id": f"{TENANT}|{shredded.instance_key}"}) is None:
            break
        await asyncio.sleep(0.5)
    else:
        pytest.fail("the shredded study's linkage record is still there after 60 s")
    assert await linkage.count_documents({"tenant": TENANT, "study_key": shredded.study_key}) == 0
    assert await linkage.find_one({"_id": f"{TENANT}|{kept.instance_key}"}) is not None
    disclosed = _linkage_cli(
        "--tenant",
        TENANT,
        "--pseudonym",
        shredded.patient_pseudonym,
        "--actor",
        "user:dr-shred",
        "--role",
        "clinician",
        "--justification",
        "Emergency: re-contact for an incidental finding",
    )
    assert disclosed.returncode == 0, disclosed.stderr
    disclosed_uids = {uid for r in json.loads(disclosed.stdout)["records"] for uid in r["uids"]}
    assert shredded.deid_study_uid not in disclosed_uids and kept.deid_study_uid in disclosed_uids
    # a repeated shred publishes key.shredded again (services finish any erasure a race left behind)
    assert "already shredded" in shred()
    await wait_for_events(
        topics.KEY_SHREDDED, lambda e: e.data.get("study_key") == shredded.study_key, count=2
    )


async def test_rotating_the_deid_keyring_rewraps_every_released_copy_which_still_opens(mongo):
    """`enclave-deid-keys rotate` (docs/deidentification.md, "Key rotation"): each released copy
    gets a new object version whose key slot is wrapped under the new KEK version while its segments
    stay byte for byte, it opens with the keyring file the analysis service reads (which follows the
    file: no restart), ``key.rotated`` says how many were re-wrapped, and deid goes on releasing
    under the new version. The command had no test until the eleventh session."""
    data, _ = mr_instance()
    event = await _deidentified(await _send(data))
    released = event.payload(InstanceDeidentified)
    old_blob, plaintext = await _open_copy(event)
    old_header, old_length = ObjectHeader.from_bytes(old_blob[:4096])
    keyring_file = Path(dev_env()["ENCLAVE_DEID_KEYRING_FILE"])
    version_before = json.loads(keyring_file.read_text())["current_version"]

    earlier = {e.id for e in await read_all(topics.KEY_ROTATED, lambda e: e.source == "deid", settle=0.5)}
    actor = f"user:it-sre-{new_event_id()[-6:]}"
    rotated = admin_command("enclave-deid-keys", "--actor", actor, "rotate")
    assert rotated.returncode == 0, rotated.stderr
    result = json.loads(rotated.stdout)
    assert result["version"] == version_before + 1 and result["rewrapped"] >= 1
    [key_event] = await read_all(topics.KEY_ROTATED, lambda e: e.source == "deid" and e.id not in earlier)
    assert (key_event.data["key_id"], key_event.data["key_version"]) == (result["key_id"], result["version"])
    assert key_event.data["rewrapped"] == result["rewrapped"]
    assert (key_event.actor, key_event.tenant) == (actor, "*")  # who rotated; not one tenant's event

    record = await mongo["deid"]["deidentified"].find_one({"object.key": released.object.key})
    ref = record["object"]
    assert ref["version_id"] != released.object.version_id  # a new object version; the old one is kept
    new_blob = await _store().read(ref["bucket"], ref["key"], ref["version_id"])
    new_header, new_length = ObjectHeader.from_bytes(new_blob[:4096])
    assert (old_header.wrapped_key.key_version, new_header.wrapped_key.key_version) == (
        version_before,
        result["version"],
    )
    assert new_blob[new_length:] == old_blob[old_length:]  # segments untouched
    keyring = LocalKeyring.load(Path(dev_env()["ENCLAVE_ANALYSIS_KEYRING_FILE"]))
    identity = ObjectIdentity(event.tenant, released.study_key, ref["key"])
    assert decrypt_bytes(new_blob, identity, keyring) == plaintext

    later = await _deidentified(await _send(mr_instance()[0]))
    later_blob, _ = await _open_copy(later)
    assert ObjectHeader.from_bytes(later_blob[:4096])[0].wrapped_key.key_version == result["version"]


async def test_unlisted_dates_personal_attributes_and_overlay_text_leave_nothing():
    """Conformance review (sixteenth session): the birth and death dates in an alternative calendar, an
    unlisted date (Study Update DateTime, unshifted beside the shifted Study Date: the patient's shift),
    unlisted address and free text, and overlay description and label text came out as sent."""
    data, ds = mr_instance()
    ds.PatientBirthDateInAlternativeCalendar = "1340/01/23"
    ds.PatientDeathDateInAlternativeCalendar = "1402/07/01"
    ds.PatientAlternativeCalendar = "I"
    # Twenty years apart, more than the largest shift (MAX_SHIFT_DAYS, ten years): one shifted date can
    # never equal the other as sent (until the twentieth session 3 days apart: a shift of -3 days, one
    # patient key in 3,650, turned the update date into the study date, and the test failed).
    ds.StudyDate, ds.StudyUpdateDateTime = "19990312", "20190315083000"
    ds.NTPSourceAddress = "ntp.hospital-hunt16.example"
    ds.DoseComment = "HUNT16DOSE by the night shift"
    ds.add_new(0x60000010, "US", 8)
    ds.add_new(0x60000011, "US", 8)
    ds.add_new(0x60000022, "LO", "HUNT16OVL description")
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60001500, "LO", "HUNT16OVL label")
    ds.add_new(0x60003000, "OW", b"\xff" * 8)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    iuid = await _send(out.getvalue())
    event = await _deidentified(iuid)
    _, plaintext = await _open_copy(event)
    for needle in (b"1340/01/23", b"1402/07/01", b"20190315", b"19990312", b"hospital-hunt16", b"HUNT16"):
        assert needle not in plaintext, needle
    copy = pydicom.dcmread(io.BytesIO(plaintext))
    for keyword in (
        "PatientBirthDateInAlternativeCalendar",
        "PatientDeathDateInAlternativeCalendar",
        "PatientAlternativeCalendar",
        "NTPSourceAddress",
    ):
        assert keyword not in copy
    shifted = copy.StudyDate
    assert copy.StudyUpdateDateTime[:8] != "20190315"
    study_shift = pydicom.valuerep.DA(shifted) - pydicom.valuerep.DA("19990312")
    update_shift = pydicom.valuerep.DA(copy.StudyUpdateDateTime[:8]) - pydicom.valuerep.DA("20190315")
    assert study_shift == update_shift and study_shift.days < 0  # one shift for every date
    assert copy.StudyUpdateDateTime[8:] == "083000"
    assert copy.DoseComment == "REMOVED"
    assert not [elem.tag for elem in copy if 0x6000 <= elem.tag.group <= 0x601E]


@pytest.mark.parametrize(
    ("sop_class", "modality", "image_type"),
    [
        ("1.2.840.10008.5.1.4.1.1.6.1", "", ["ORIGINAL", "PRIMARY"]),  # Ultrasound without a Modality
        ("1.2.840.10008.5.1.4.1.1.77.1.6", "SM", ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]),
        ("1.2.840.10008.5.1.4.1.1.77.1.5.1", "OP", ["ORIGINAL", "PRIMARY"]),
    ],
)
async def test_kinds_known_for_text_in_pixels_are_quarantined_by_sop_class(sop_class, modality, image_type):
    """Conformance review (sixteenth session): the rule keyed on Modality only, so these were released
    with their pixels as they were."""
    _, ds = mr_instance()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.Modality, ds.ImageType = modality, image_type
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    iuid = await _send(out.getvalue())
    (event,) = await wait_for_events(topics.INSTANCE_QUARANTINED, _for(iuid), timeout=90)
    quarantined = event.payload(InstanceQuarantined)
    assert quarantined.reason_code == "burned_in_risk" and "not verified clean" in quarantined.reason
    assert PHI["PatientID"] not in quarantined.reason
    assert await read_all(topics.INSTANCE_DEIDENTIFIED, _for(iuid), settle=1.0) == []
