"""``enclave-deid-redo`` on the real stack (docs/deidentification.md, "Redo released copies"): an
instance with planted PHI is uploaded through the gateway twice (the second a duplicate), its copy is
made stale the way an older deid left it (a record without a revision or original, a copy version
carrying an unshifted date and a planted institution), and the command, run as an operator runs it,
replaces the copy with one that follows the current rules, deletes every version of the old one, tells
both uploads, records its access events, and redoes nothing when run again."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import pydicom
from enclave_common import topics
from enclave_common.crypto import LocalKeyring, ObjectIdentity, encrypt_bytes
from enclave_common.envelope import new_event_id
from enclave_common.events import InstanceDeidentified

from .support import PHI, admin_command, dev_env, mr_instance, read_all, wait_for_events
from .test_deid import DEFAULT_POLICY, _open_copy, _phi_needles, _store, find_leaks
from .test_gateway_support import GATEWAY, bearer, new_tenant

DEID_BUCKET = "enclave-deidentified"


async def _upload(data: bytes, tenant: str) -> str:
    files = [("file", ("a.dcm", data, "application/dicom"))]
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.post(
            f"{GATEWAY}/api/v1/imaging/upload",
            files=files,
            headers=bearer("it-redo-pacs", tenant, "uploader"),
        )
    assert answer.status_code == 200, answer.text
    [accepted] = answer.json()["accepted"]
    return str(accepted["imaging_id"])


def _versions(key: str) -> list[dict[str, str]]:
    found = _store()._client.list_object_versions(Bucket=DEID_BUCKET, Prefix=key)
    return [v for v in found.get("Versions", []) + found.get("DeleteMarkers", []) if v["Key"] == key]


def _redo(tenant: str, *args: str, exit_code: int = 0) -> dict[str, Any]:
    done = admin_command("enclave-deid-redo", "--tenant", tenant, *args)
    assert done.returncode == exit_code, done.stdout + done.stderr
    for value in PHI.values():
        assert value not in done.stdout and value not in done.stderr
    return dict(json.loads(done.stdout))


async def test_redo_replaces_a_stale_copy_deletes_every_old_version_and_a_second_run_redoes_nothing(mongo):
    tenant = new_tenant("it-redo")
    data, original = mr_instance()
    first = await _upload(data, tenant)
    (event,) = await wait_for_events(
        topics.INSTANCE_DEIDENTIFIED, lambda e: e.data.get("instance_upload_id") == first, timeout=120
    )
    second = await _upload(data, tenant)  # a duplicate: the recorded outcome is re-emitted for it
    await wait_for_events(
        topics.INSTANCE_DEIDENTIFIED, lambda e: e.data.get("instance_upload_id") == second, timeout=120
    )
    released = event.payload(InstanceDeidentified)
    records = mongo["deid"]["deidentified"]
    record_id = f"{tenant}|{released.instance_key}"
    record = await records.find_one({"_id": record_id})
    assert record["revision"] >= 1 and record["original"]["key"] == f"originals/{first}"
    current_revision = record["revision"]  # the service's: what the command calls current too
    assert {e["instance_upload_id"] for e in record["emitted"]} == {first, second}

    # The copy an older deid released: an unshifted date beside the shifted ones, a planted
    # institution; its record says no revision and names no original (as records before it did).
    _, plaintext = await _open_copy(event)
    stale = pydicom.dcmread(io.BytesIO(plaintext))
    assert stale.StudyDate != original.StudyDate
    stale.StudyDate = original.StudyDate
    stale.InstitutionName = PHI["InstitutionName"]
    out = io.BytesIO()
    stale.save_as(out, enforce_file_format=True)
    old_key = released.object.key
    identity = ObjectIdentity(tenant, released.study_key, old_key)
    keyring = LocalKeyring.load(Path(dev_env()["ENCLAVE_DEID_KEYRING_FILE"]))
    dek, wrapped = keyring.generate_data_key(identity.key_context())
    put = await _store().put(
        DEID_BUCKET, old_key, io.BytesIO(encrypt_bytes(out.getvalue(), dek, wrapped, identity))
    )
    await records.update_one(
        {"_id": record_id},
        {
            "$set": {"object.version_id": put.version_id, "outcome.data.object.version_id": put.version_id},
            "$unset": {"revision": "", "original": "", "source_size": ""},
        },
    )
    assert len(_versions(old_key)) == 2

    dry = _redo(tenant, "--actor", "user:it-privacy", "--dry-run")
    assert dry == {
        "dry_run": True,
        "revision": current_revision,
        "selected": 1,
        "by_reason": {"revision_0": 1},
        "outcomes": {},
    }
    assert "revision" not in await records.find_one({"_id": record_id})

    actor = f"user:it-privacy-{new_event_id()[-6:]}"
    reason = "Copies released under older rules, ticket PRIV-1234"
    done = _redo(tenant, "--actor", actor, "--reason", reason)
    assert done["selected"] == 1 and done["outcomes"] == {"redone": 1}, done

    record = await records.find_one({"_id": record_id})
    assert record["status"] == "deidentified" and record["revision"] == done["revision"] >= 1
    assert record["object"]["key"] != old_key and "pending" not in record and "redo" not in record
    assert record["original"]["key"] == f"originals/{first}"  # derived for the old record, then recorded
    assert _versions(old_key) == []  # the stale copy and the version before it: every version gone
    assert [v["VersionId"] for v in _versions(record["object"]["key"])] == [record["object"]["version_id"]]

    redone = await wait_for_events(
        topics.INSTANCE_DEIDENTIFIED,
        lambda e: e.actor == actor and e.tenant == tenant,
        count=2,
        timeout=60,
    )
    assert {e.data["instance_upload_id"] for e in redone} == {first, second}
    for new_event in redone:
        copy = new_event.payload(InstanceDeidentified)
        assert copy.object.model_dump() == record["object"] and copy.instance_key == released.instance_key
        ciphertext, new_plaintext = await _open_copy(new_event)
        for needle in _phi_needles(original):
            assert needle not in new_plaintext and needle not in ciphertext
        assert find_leaks(original, new_plaintext, DEFAULT_POLICY) == []
        assert pydicom.dcmread(io.BytesIO(new_plaintext)).StudyDate != original.StudyDate
    assert len({e.correlation_id for e in redone}) == 1

    access = await wait_for_events(
        topics.ACCESS_RECORDED, lambda e: e.actor == actor and e.data.get("action") == "deid_redo", count=2
    )
    assert {e.correlation_id for e in access} == {redone[0].correlation_id}
    assert all(e.tenant == tenant and e.data["outcome"] == "success" for e in access)
    details = sorted(e.data["detail"] for e in access)
    assert details == [f"reason: {reason}; 1 selected; redone 1", f"reason: {reason}; started"]
    linkage = await mongo["deid"]["linkage"].find_one({"_id": record_id})
    assert linkage is not None and linkage["patient_pseudonym"] == record["patient_pseudonym"]

    again = _redo(tenant, "--actor", actor, "--reason", reason)
    assert (again["selected"], again["outcomes"]) == (0, {})
    # The command has exited, so what it published is acknowledged and before each partition's end
    # offset: read_all reads every record up to the end offsets taken now, not for a while.
    after = await read_all(topics.INSTANCE_DEIDENTIFIED, lambda e: e.actor == actor, settle=0.5)
    assert sorted(e.id for e in after) == sorted(e.id for e in redone)
    assert await read_all(topics.INSTANCE_QUARANTINED, lambda e: e.actor == actor, settle=0.5) == []
    assert (await records.find_one({"_id": record_id}))["object"] == record["object"]


async def test_a_copy_that_cannot_be_redone_is_reported_once_and_withdrawn_on_request(mongo):
    """An original that is not the content the record was made from: the first run refuses the
    copy (exit 3), the next reports the known refusal (exit 0), --withdraw-unredoable withdraws it."""
    tenant = new_tenant("it-redo-unredoable")
    data, _ = mr_instance()
    first = await _upload(data, tenant)
    (event,) = await wait_for_events(
        topics.INSTANCE_DEIDENTIFIED, lambda e: e.data.get("instance_upload_id") == first, timeout=120
    )
    released = event.payload(InstanceDeidentified)
    records = mongo["deid"]["deidentified"]
    record_id = f"{tenant}|{released.instance_key}"
    await records.update_one(
        {"_id": record_id}, {"$set": {"source_sha256": "0" * 64}, "$unset": {"revision": ""}}
    )
    actor = f"user:it-privacy-{new_event_id()[-6:]}"
    reason = "Copies released under older rules, ticket PRIV-1235"
    refused = _redo(tenant, "--actor", actor, "--reason", reason, exit_code=3)
    assert refused["outcomes"] == {"refused_original_changed": 1}, refused
    assert len(_versions(released.object.key)) == 1
    dry = _redo(tenant, "--actor", actor, "--dry-run")
    assert dry["by_reason"] == {"refused_original_changed": 1}, dry
    known = _redo(tenant, "--actor", actor, "--reason", reason)
    assert known["outcomes"] == {"still_refused_original_changed": 1}, known

    withdrawn = _redo(tenant, "--actor", actor, "--reason", reason, "--withdraw-unredoable")
    assert withdrawn["outcomes"] == {"withdrawn_unredoable_original_changed": 1}, withdrawn
    record = await records.find_one({"_id": record_id})
    assert record["status"] == "quarantined" and "object" not in record and "pending" not in record
    assert _versions(released.object.key) == []
    assert await mongo["deid"]["linkage"].find_one({"_id": record_id}) is None
    (told,) = await wait_for_events(
        topics.INSTANCE_QUARANTINED, lambda e: e.actor == actor and e.tenant == tenant, timeout=60
    )
    assert told.data["instance_upload_id"] == first
    assert told.data["reason_code"] == "unredoable_original_changed"
    access = await wait_for_events(
        topics.ACCESS_RECORDED,
        lambda e: e.actor == actor and "withdraw_unredoable" in e.data.get("target", ""),
        count=2,
    )
    assert all(e.data["action"] == "deid_redo" for e in access)
    assert _redo(tenant, "--actor", actor, "--dry-run")["selected"] == 0
