"""A dataset encoded otherwise than its file meta says (an adversarial hunt against the running stack).

The gateway accepts a file whose meta says Explicit VR Little Endian while its dataset is implicit VR, or
the other way round: it follows the bytes, as pydicom does when reading (docs/gateway-input.md). Deid
read such a file, then wrote the implicit-VR elements (which have no VR) as explicit VR and failed:
the instance was quarantined as ``unsupported_instance`` ("could not be written as Part 10
(TypeError)"). Now the copy is written in the encoding the dataset was read in, and its meta says so;
a meta naming an encapsulated syntax (explicit VR by definition) is kept and the dataset converted to it.
"""

from __future__ import annotations

import base64
import io
import struct
import warnings

import pydicom
import pytest
from deid_keys import ALL_OPTIONS
from deid_leakscan import find_leaks
from enclave_common.crypto import LocalKeyring, ObjectIdentity, decrypt_bytes, encrypt_bytes
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import read_instance, write_instance
from enclave_deid.pipeline import DeidPipeline, Quarantined, _Written
from enclave_deid.policy import DeidPolicy
from enclave_deid.pseudonym_keys import DeidPseudonymKeys
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless

TENANT = "tenant-a"
PATIENT_NAME = "QUIXOTE^ALONSO"
PATIENT_ID = "PHI-MRN-4711-MISMATCH"
INSTITUTION = "HOSPITAL OF LA MANCHA"
POLICIES = {"basic": DeidPolicy(), "service default": DeidPolicy(retain_longitudinal_modified_dates=True)}
POLICIES["all options"] = ALL_OPTIONS
#: (the meta's transfer syntax, the dataset's real encoding is implicit VR)
MISMATCHES = {
    "meta explicit, dataset implicit": (ExplicitVRLittleEndian, True),
    "meta implicit, dataset explicit": (ImplicitVRLittleEndian, False),
}


def _planted(name: str = "MR_small.dcm", **attributes: str) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.PatientName, ds.PatientID, ds.InstitutionName = PATIENT_NAME, PATIENT_ID, INSTITUTION
    ds.PatientBirthDate = "19730415"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _part10(ds: Dataset, meta_syntax: str, implicit: bool) -> bytes:
    """Preamble, DICM, a file meta naming ``meta_syntax``, then the dataset encoded as ``implicit`` says
    (little endian), whatever the meta names."""
    meta = FileMetaDataset(ds.file_meta)
    meta.TransferSyntaxUID = meta_syntax
    meta_bytes = DicomBytesIO()
    write_file_meta_info(meta_bytes, meta, enforce_standard=True)
    dataset_bytes = DicomBytesIO()
    dataset_bytes.is_implicit_VR, dataset_bytes.is_little_endian = implicit, True
    write_dataset(dataset_bytes, ds)
    return bytes(128) + b"DICM" + meta_bytes.getvalue() + dataset_bytes.getvalue()


def _dataset_is_implicit(part10: bytes) -> bool:
    """Whether the first element after the file meta has no VR (read from the bytes, not by pydicom)."""
    assert part10[128:132] == b"DICM" and part10[132:136] == b"\x02\x00\x00\x00"
    (meta_length,) = struct.unpack("<I", part10[140:144])
    first = part10[144 + meta_length :][:8]
    return not (first[4:6].isalpha() and first[4:6].isupper())


def _read_without_warning(part10: bytes) -> Dataset:
    """pydicom warns when the dataset contradicts its meta: here that is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = pydicom.dcmread(io.BytesIO(part10))
        for elem in ds.iterall():  # every value decodes under the VR it was read with
            _ = elem.value
    return ds


def _deidentify(original: bytes, policy: DeidPolicy, keys) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's "Expected explicit VR, but found implicit VR"
        dataset = read_instance(original)
    result = deidentify(dataset, policy, keys, DeidContext(TENANT))
    spliced = write_instance(result.dataset, original)  # as the service writes small instances
    assert write_instance(result.dataset) == spliced
    return spliced


def _pipeline(deid_kek: LocalKeyring) -> DeidPipeline:
    return DeidPipeline(
        store=None,  # type: ignore[arg-type]  # the transform does not touch the store
        study_keys=None,  # type: ignore[arg-type]
        deid_kek=deid_kek,
        keys=DeidPseudonymKeys.from_base64(base64.b64encode(b"k" * 32).decode(), "x"),
        bucket="enclave-deidentified",
        max_instance_bytes=10 * 1024 * 1024,
    )


def _transform(plaintext: bytes, deid_kek: LocalKeyring) -> _Written | Quarantined:
    """The service's worker-thread transform: decrypt, parse, burned-in check, de-identify, write."""
    originals = LocalKeyring.generate("ingest")
    source = ObjectIdentity("t", "study-key", "originals/1")
    dek, wrapped = originals.generate_data_key(source.key_context())
    blob = encrypt_bytes(plaintext, dek, wrapped, source, segment_size=4096)
    target = ObjectIdentity("t", "study-key", "deidentified/1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _pipeline(deid_kek)._transform(io.BytesIO(blob), source, originals, "t", DeidPolicy(), target)


@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_the_service_releases_a_copy_whose_meta_says_how_it_is_encoded(mismatch: str) -> None:
    meta_syntax, implicit = MISMATCHES[mismatch]
    original = _part10(_planted(), meta_syntax, implicit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pydicom.dcmread(io.BytesIO(original)).PatientID == PATIENT_ID  # pydicom reads it
    deid_kek = LocalKeyring.generate("deid")
    written = _transform(original, deid_kek)
    assert isinstance(written, _Written)  # not quarantined
    with written.ciphertext as file:
        copy = decrypt_bytes(file.read(), ObjectIdentity("t", "study-key", "deidentified/1"), deid_kek)
    for planted in (PATIENT_NAME, "QUIXOTE", PATIENT_ID, INSTITUTION, "19730415"):
        assert planted.encode() not in copy
    output = _read_without_warning(copy)
    assert output.file_meta.TransferSyntaxUID == (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    )
    assert _dataset_is_implicit(copy) is implicit
    assert output.PatientID == written.patient_pseudonym
    assert output.PixelData == _planted().PixelData


@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_a_mislabelled_dataset_gives_the_copy_its_truthfully_labelled_twin_gives(
    mismatch: str, policy_name: str, keys
) -> None:
    """Follow the bytes: the copy is the one the same bytes under a truthful meta give, byte for byte,
    so every rule (PHI, UIDs, marks) applies as it does to any other file, and the VRs read back are the
    ones a correctly encoded copy has."""
    meta_syntax, implicit = MISMATCHES[mismatch]
    policy = POLICIES[policy_name]
    planted = _planted(StudyDescription=f"MR BRAIN {PATIENT_NAME}")
    twin = _part10(planted, ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian, implicit)
    copy = _deidentify(_part10(planted, meta_syntax, implicit), policy, keys)
    assert copy == _deidentify(twin, policy, keys)
    assert find_leaks(pydicom.dcmread(io.BytesIO(twin)), copy, policy) == []
    for value in (PATIENT_ID, INSTITUTION, "19730415", str(planted.SOPInstanceUID)):
        assert value.encode() not in copy
    output = _read_without_warning(copy)
    assert output["Rows"].VR == "US" and output["PixelSpacing"].VR == "DS"
    assert output.PatientIdentityRemoved == "YES"


@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_burned_in_text_is_still_quarantined(mismatch: str) -> None:
    meta_syntax, implicit = MISMATCHES[mismatch]
    original = _part10(_planted(BurnedInAnnotation="YES"), meta_syntax, implicit)
    outcome = _transform(original, LocalKeyring.generate("deid"))
    assert isinstance(outcome, Quarantined)
    assert outcome.code == "burned_in_risk"


def test_an_encapsulated_syntax_is_kept_and_the_implicit_dataset_converted_to_it(keys) -> None:
    """JPEG 2000 is explicit VR by definition: the copy keeps the meta's syntax, the dataset is converted
    to explicit VR (pixel data as OB, byte-identical), rather than labelled as the bytes were."""
    planted = _planted("MR_small_jp2klossless.dcm")
    assert planted.file_meta.TransferSyntaxUID == JPEG2000Lossless
    copy = _deidentify(_part10(planted, JPEG2000Lossless, implicit=True), DeidPolicy(), keys)
    assert PATIENT_ID.encode() not in copy and INSTITUTION.encode() not in copy
    output = _read_without_warning(copy)
    assert output.file_meta.TransferSyntaxUID == UID(JPEG2000Lossless)
    assert not _dataset_is_implicit(copy)
    assert output["PixelData"].VR == "OB" and output.PixelData == planted.PixelData
    assert output["Rows"].VR == "US" and output.Rows == planted.Rows


def test_read_instance_labels_the_dataset_as_the_bytes_are() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_instance(_part10(_planted(), ExplicitVRLittleEndian, implicit=True))
    assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert ds.original_encoding == (True, True)
