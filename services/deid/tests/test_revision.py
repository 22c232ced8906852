"""The output of deid is pinned to ``DEID_REVISION`` (``enclave_deid/revision.py``).

If this test fails, deid's output for the same input changed. That is allowed, but the copies released
before are then stale: bump ``DEID_REVISION`` (so ``enclave-deid-redo`` re-de-identifies them), then
update ``PINNED`` to the digests this test prints, under the new revision. A change that must not
change any output (a refactor, a speed-up) must leave this test green.
"""

from __future__ import annotations

import hashlib
import io
import json

import pydicom
import pytest
from deid_keys import ALL_OPTIONS, HmacKeys
from enclave_deid.burned_in import assess_burned_in_risk
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import read_instance, write_instance_to
from enclave_deid.policy import DeidPolicy
from enclave_deid.profiles import MERGED_TABLE
from enclave_deid.revision import DEID_REVISION, revision_of
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

#: A constructed instance with what the test files lack (below, ``_synthetic``).
SYNTHETIC = "synthetic"
#: SHA-256 of the de-identified Part 10 file, by (revision, file, policy).
PINNED = {
    (1, "MR_small.dcm", "basic"): "e5e8fc9b237f69e68cb582c3b8ba6d7ed07abf96b7d497576e3d14a545504bf3",
    (1, "MR_small.dcm", "all"): "35fdfe8be2eaadf352a05b8cedbd8a90158f4813a53fe2bd4326e2b6d4e3a393",
    (1, "CT_small.dcm", "basic"): "6677c22593043d33bd59b7d847bd8e6bca3eea792235ff6a86a082a77c2bd54a",
    (1, "CT_small.dcm", "all"): "0c8f6f92491672029da1e4c07bbf9fed03fa54e3e23b4dec44214a950ad0a0f8",
    (1, "JPEG2000.dcm", "basic"): "60f14f6f2caf2add06976bb24082210d4f60ac250432c16dc02a6c1ac42a1744",
    (1, "JPEG2000.dcm", "all"): "ae8b532d80ba1fcb531d25fc84a6b81f757645e727a2bf1cd39eac0522416ed4",
    (1, SYNTHETIC, "basic"): "0f57ab85da8f92e72c32d9ed361154f699ba77e9b38ca3efebafc27305929193",
    (1, SYNTHETIC, "all"): "48ecbd949a9844e1fd74ace4113df551aa30f3e281cdad1f63ce8cf3c9071be7",
}
#: SHA-256 of the profile's action table (Table E.1-1 with deid's own rows), by revision.
PINNED_TABLE = {1: "d9481d0dafec92d7f2c30a01f7648376812940bea05289705fb95213cd7476d5"}
#: Whether each variant of MR_small is quarantined, by revision.
QUARANTINED = {
    1: {"as is": False, "BurnedInAnnotation YES": True, "Modality US": True, "Modality OT": True},
}
POLICIES = {"basic": DeidPolicy(), "all": ALL_OPTIONS}
BUMP = "deid's output changed: bump DEID_REVISION in enclave_deid/revision.py and pin the new output here"


def _synthetic() -> bytes:
    """An MR instance with what a rule acts on and the pydicom test files lack: pixel values with
    bits set above BitsStored (12 of 16: a retired overlay's place), malformed DS and DA values,
    dates the table does not list, free text with a URL and the study's day written out, a URL
    attribute, private attributes and nested sequences."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Modality = "MR"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PatientName = "Revision^Pinned"
    ds.PatientID = "REV-0001"
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20190312"
    ds.StudyTime = "101112"
    ds.AccessionNumber = "ACC-REV-1"
    ds.InstitutionName = "St Revision Hospital"
    ds.StudyDescription = "Head scan of 12 March 2019"
    ds.ImageComments = "Seen 12/03/2019 and 2019-03-12; see https://pacs.example.org/view?id=REV-0001"
    ds.RetrieveURL = "https://pacs.example.org/wado/1"
    ds.SliceThickness = "1.5"
    for tag, vr, value in (
        (0x00180088, "DS", b"REVPHI  "),  # SpacingBetweenSlices: malformed
        (0x00141020, "DA", b"REVPHI2 "),  # ExpiryDate: unlisted, malformed
    ):
        ds[tag] = RawDataElement(BaseTag(tag), vr, len(value), value, 0, False, True, True, False)
    ds.add_new(0x00140102, "DA", "20190312")  # SecondaryReviewDate: unlisted, valid
    ds.add_new(0x00290010, "LO", "ACME REVISION 1.0")  # private creator
    ds.add_new(0x00291001, "LO", "private REV-0001")
    reference = Dataset()
    reference.ReferencedSOPClassUID = MRImageStorage
    reference.ReferencedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.4"
    nested = Dataset()
    nested.CodeMeaning = "Seen on 2019-03-12"
    nested.CodeValue = "REV"
    nested.CodingSchemeDesignator = "99REV"
    reference.PurposeOfReferenceCodeSequence = Sequence([nested])
    ds.ReferencedImageSequence = Sequence([reference])
    ds.Rows = ds.Columns = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = b"".join(((0xF000 | n * 0x101) & 0xFFFF).to_bytes(2, "little") for n in range(16))
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _input(name: str) -> bytes:
    if name == SYNTHETIC:
        return _synthetic()
    return open(get_testdata_file(name), "rb").read()  # noqa: SIM115 - a test file read whole


#: The cases of the current revision: built from ``DEID_REVISION``, so a bump without new pins fails
#: ``test_the_current_revision_has_pinned_cases`` instead of collecting nothing (a skip).
CASES = [(name, policy) for revision, name, policy in PINNED if revision == DEID_REVISION]


def test_the_current_revision_has_pinned_cases() -> None:
    assert len(CASES) >= 8, f"no output pinned for DEID_REVISION {DEID_REVISION}: {BUMP}"
    assert DEID_REVISION in PINNED_TABLE and DEID_REVISION in QUARANTINED, BUMP


@pytest.mark.parametrize(("name", "policy"), CASES or [("none pinned", "basic")])
def test_output_is_the_one_pinned_for_the_current_revision(name: str, policy: str) -> None:
    data = _input(name)
    result = deidentify(read_instance(io.BytesIO(data)), POLICIES[policy], HmacKeys(), DeidContext("t"))
    out = io.BytesIO()
    write_instance_to(result.dataset, out, data)
    digest = hashlib.sha256(out.getvalue()).hexdigest()
    assert PINNED.get((DEID_REVISION, name, policy)) == digest, f"{BUMP} (now {name}/{policy}: {digest})"


def test_the_action_table_is_the_one_pinned_for_the_current_revision() -> None:
    table = json.dumps(sorted((tag, list(row)) for tag, row in MERGED_TABLE.items()))
    digest = hashlib.sha256(table.encode()).hexdigest()
    assert PINNED_TABLE.get(DEID_REVISION) == digest, f"{BUMP} (now the table: {digest})"


def test_quarantine_decisions_are_the_ones_pinned_for_the_current_revision() -> None:
    variants = {
        "as is": {},
        "BurnedInAnnotation YES": {"BurnedInAnnotation": "YES"},
        "Modality US": {"Modality": "US"},
        "Modality OT": {"Modality": "OT"},
    }
    decided = {}
    for label, attributes in variants.items():
        ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        decided[label] = assess_burned_in_risk(ds) is not None
    assert QUARANTINED.get(DEID_REVISION) == decided, f"{BUMP} (now {decided})"


def test_records_without_a_revision_are_revision_zero() -> None:
    assert revision_of({}) == 0 and revision_of({"revision": None}) == 0
    assert revision_of({"revision": DEID_REVISION}) == DEID_REVISION
