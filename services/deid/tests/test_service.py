"""The service's adapters without network: settings, keyed date shift, linkage vault crypto, and the worker-thread
transform from an encrypted original to an encrypted copy (decrypt, parse, quarantine, de-identify, encrypt)."""

from __future__ import annotations

import base64
import io
import os
import tempfile
from pathlib import Path

import pydicom
import pytest
from enclave_common.crypto import LocalKeyring, ObjectIdentity, decrypt_bytes, encrypt_bytes
from enclave_common.crypto.errors import KeyUnwrapError
from enclave_common.errors import ConfigurationError
from enclave_deid.config import DeidSettings
from enclave_deid.deidentify import LinkageRecord
from enclave_deid.linkage import LinkageUnreadable, open_linkage, rewrap_linkage, seal_linkage
from enclave_deid.pipeline import (
    WITHHELD,
    DeidPipeline,
    InstanceTooLarge,
    OriginalUndecryptable,
    Quarantined,
    UnreadableInstance,
    UnsupportedInstance,
    _Written,
)
from enclave_deid.policy import DeidPolicy
from enclave_deid.pseudonym_keys import MAX_SHIFT_DAYS, DeidPseudonymKeys
from pydicom.data import get_testdata_file

KEY = base64.b64encode(b"k" * 32).decode()
PATIENT_NAME = "QUIXOTE^ALONSO"
PATIENT_ID = "PHI-MRN-4711-UNIT"


def test_settings_tenant_policies_from_json_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "ENCLAVE_DEID_TENANT_POLICIES", '{"hospital-a": {"retain_patient_characteristics": true}}'
    )
    settings = DeidSettings()
    assert settings.policy_for("hospital-a") == DeidPolicy(retain_patient_characteristics=True)
    assert settings.policy_for("hospital-b") == DeidPolicy(retain_longitudinal_modified_dates=True)


def test_settings_refuse_an_unknown_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENCLAVE_DEID_TENANT_POLICIES", '{"hospital-a": {"retain_uids": "sometimes"}}')
    with pytest.raises(ValueError, match="retain_uids"):
        DeidSettings()


def test_pseudonym_key_from_file_wins_and_an_unreadable_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "hmac.key"
    path.write_text(KEY + "\n")
    assert DeidSettings(pseudonym_key="other", pseudonym_key_file=path).pseudonym_key_base64() == KEY
    with pytest.raises(ConfigurationError, match="ENCLAVE_DEID_PSEUDONYM_KEY_FILE"):
        DeidSettings(pseudonym_key_file=tmp_path / "missing").pseudonym_key_base64()


def test_short_or_missing_pseudonym_key_is_refused_by_setting_name() -> None:
    with pytest.raises(ConfigurationError, match="ENCLAVE_DEID_PSEUDONYM_KEY"):
        DeidPseudonymKeys.from_base64(None, "ENCLAVE_DEID_PSEUDONYM_KEY")
    with pytest.raises(ConfigurationError, match="at least 32 bytes"):
        DeidPseudonymKeys.from_base64(base64.b64encode(b"short").decode(), "ENCLAVE_DEID_PSEUDONYM_KEY")


def test_date_shift_is_stable_in_range_and_scoped_by_tenant_and_key() -> None:
    keys = DeidPseudonymKeys.from_base64(KEY, "x")
    shifts = [keys.date_shift_days("t", f"patient-{i}") for i in range(200)]
    assert all(-MAX_SHIFT_DAYS <= s <= -1 for s in shifts)
    assert len(set(shifts)) > 150
    assert keys.date_shift_days("t", "p") == DeidPseudonymKeys.from_base64(KEY, "x").date_shift_days("t", "p")
    other_tenant = [keys.date_shift_days("u", f"patient-{i}") for i in range(200)]
    other_key = DeidPseudonymKeys(b"z" * 32)
    assert other_tenant != shifts
    assert [other_key.date_shift_days("t", f"patient-{i}") for i in range(200)] != shifts
    assert "k" * 8 not in repr(keys)


def _linkage() -> LinkageRecord:
    return LinkageRecord("t", "pseudo", PATIENT_ID, PATIENT_NAME, "", -42, {"2.25.1": "1.2.3.4.5"})


def test_linkage_is_sealed_opened_and_bound_to_patient_and_instance() -> None:
    kek = LocalKeyring.generate("deid")
    doc = seal_linkage(kek, _linkage(), "instance-1", "study-1")
    assert PATIENT_ID not in repr(doc)
    assert "QUIXOTE" not in repr(doc)
    assert "1.2.3.4.5" not in repr(doc)
    opened = open_linkage(kek, doc)
    assert opened["patient_id"] == PATIENT_ID
    assert opened["uids"] == {"2.25.1": "1.2.3.4.5"}
    with pytest.raises(LinkageUnreadable):
        open_linkage(kek, {**doc, "instance_key": "instance-2"})
    with pytest.raises(KeyUnwrapError):
        open_linkage(kek, {**doc, "patient_pseudonym": "someone-else"})


def test_linkage_rewrap_after_rotation_keeps_it_readable() -> None:
    kek = LocalKeyring.generate("deid")
    doc = seal_linkage(kek, _linkage(), "instance-1", "study-1")
    assert rewrap_linkage(kek, doc) is None
    kek.rotate()
    rewrapped = rewrap_linkage(kek, doc)
    assert rewrapped is not None
    assert rewrapped["key_version"] == 2
    kek.retire(1)
    assert open_linkage(kek, {**doc, "wrapped_key": rewrapped})["patient_name"] == PATIENT_NAME


# -- the worker-thread transform ------------------------------------------------------------------------


def _instance(**attributes: str) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    for name, value in attributes.items():
        setattr(ds, name, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _pipeline(tmp_path: Path | None, deid_kek: LocalKeyring, limit: int = 10 * 1024 * 1024) -> DeidPipeline:
    return DeidPipeline(
        store=None,  # type: ignore[arg-type]  # the transform does not touch the store
        study_keys=None,  # type: ignore[arg-type]
        deid_kek=deid_kek,
        keys=DeidPseudonymKeys.from_base64(KEY, "x"),
        bucket="enclave-deidentified",
        max_instance_bytes=limit,
        work_dir=tmp_path,
    )


def _transform(pipeline: DeidPipeline, plaintext: bytes) -> _Written | Quarantined:
    originals = LocalKeyring.generate("ingest")
    source = ObjectIdentity("t", "study-key", "originals/1")
    dek, wrapped = originals.generate_data_key(source.key_context())
    blob = encrypt_bytes(plaintext, dek, wrapped, source, segment_size=4096)
    target = ObjectIdentity("t", "study-key", "deidentified/1")
    return pipeline._transform(io.BytesIO(blob), source, originals, "t", DeidPolicy(), target)


def test_transform_without_a_work_dir_uses_the_system_temporary_directory() -> None:
    """The service's default (``ENCLAVE_DEID_WORK_DIR`` unset) is None: the system's temp directory."""
    written = _transform(_pipeline(None, LocalKeyring.generate("deid")), _instance())
    assert isinstance(written, _Written)
    with written.ciphertext as ciphertext:
        where = os.readlink(f"/proc/self/fd/{ciphertext.fileno()}")  # unnamed: "<dir>/#<inode> (deleted)"
        assert Path(where).parent == Path(tempfile.gettempdir()), where
        assert os.fstat(ciphertext.fileno()).st_size > written.size


def test_transform_writes_a_copy_only_the_deid_keyring_opens(tmp_path: Path) -> None:
    deid_kek = LocalKeyring.generate("deid")
    original = _instance()
    written = _transform(_pipeline(tmp_path, deid_kek), original)
    assert isinstance(written, _Written)
    with written.ciphertext as file:
        ciphertext = file.read()
    assert list(tmp_path.iterdir()) == []  # the ciphertext had no name in the work directory
    assert PATIENT_ID.encode() not in ciphertext
    copy = decrypt_bytes(ciphertext, ObjectIdentity("t", "study-key", "deidentified/1"), deid_kek)
    assert PATIENT_ID.encode() not in copy
    assert b"QUIXOTE" not in copy
    output = pydicom.dcmread(io.BytesIO(copy))
    assert output.PatientID == written.patient_pseudonym
    assert output.SOPInstanceUID == written.deid_instance_uid
    assert written.linkage.patient_id == PATIENT_ID
    assert written.size == len(copy)
    with pytest.raises(KeyUnwrapError):
        decrypt_bytes(ciphertext, ObjectIdentity("t", "other-study", "deidentified/1"), deid_kek)


def test_burned_in_annotation_is_quarantined_and_nothing_is_written(tmp_path: Path) -> None:
    outcome = _transform(
        _pipeline(tmp_path, LocalKeyring.generate("deid")), _instance(BurnedInAnnotation="YES")
    )
    assert isinstance(outcome, Quarantined)
    assert "BurnedInAnnotation" in outcome.reason
    assert list(tmp_path.iterdir()) == []


def test_a_modality_that_cannot_be_read_is_withheld_as_unsupported_not_dead_lettered(tmp_path: Path) -> None:
    """Modality written as FD with a 6-byte value passes the gateway; the burned-in check raised
    BytesLengthException outside the guarded steps, so the event was dead-lettered and the instance
    stayed ``stored`` for good (conformance review, sixteenth session). ``UnsupportedInstance`` is one
    of the errors the handler quarantines (``WITHHELD``)."""
    original = _instance()
    header = b"\x08\x00\x60\x00CS\x02\x00MR"
    assert original.count(header) == 1
    mangled = original.replace(header, b"\x08\x00\x60\x00FD\x06\x00" + b"\x00" * 6)
    with pytest.raises(UnsupportedInstance, match="could not be read") as caught:
        _transform(_pipeline(tmp_path, LocalKeyring.generate("deid")), mangled)
    assert isinstance(caught.value, WITHHELD)
    assert PATIENT_ID not in str(caught.value) and "QUIXOTE" not in str(caught.value)
    assert "burned_in.py" not in str(caught.value) and caught.value.__cause__ is None
    assert list(tmp_path.iterdir()) == []


def test_unreadable_original_is_a_permanent_error_without_its_content(tmp_path: Path) -> None:
    with pytest.raises(UnreadableInstance, match="does not parse") as caught:
        _transform(_pipeline(tmp_path, LocalKeyring.generate("deid")), b"not dicom " + PATIENT_ID.encode())
    assert PATIENT_ID not in str(caught.value)


def test_original_under_another_key_is_a_permanent_error(tmp_path: Path) -> None:
    pipeline = _pipeline(tmp_path, LocalKeyring.generate("deid"))
    source = ObjectIdentity("t", "study-key", "originals/1")
    stranger = LocalKeyring.generate("ingest")
    dek, wrapped = stranger.generate_data_key(source.key_context())
    blob = encrypt_bytes(_instance(), dek, wrapped, source)
    with pytest.raises(OriginalUndecryptable):
        pipeline._transform(
            io.BytesIO(blob), source, LocalKeyring.generate("ingest"), "t", DeidPolicy(), source
        )


def test_size_limit_at_the_limit_and_just_past_it(tmp_path: Path) -> None:
    original = _instance()
    at_limit = _pipeline(tmp_path, LocalKeyring.generate("deid"), limit=len(original))
    at_limit.check_size(len(original))
    written = _transform(at_limit, original)
    assert isinstance(written, _Written)
    written.ciphertext.close()
    past = _pipeline(tmp_path, LocalKeyring.generate("deid"), limit=len(original) - 1)
    with pytest.raises(InstanceTooLarge, match="ENCLAVE_DEID_MAX_INSTANCE_BYTES"):
        past.check_size(len(original))
    with pytest.raises(InstanceTooLarge):  # the event's size may lie: the decrypted bytes are counted too
        _transform(past, original)
