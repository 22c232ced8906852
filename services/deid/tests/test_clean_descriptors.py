"""Clean Descriptors: identifying values repeated in the descriptor text the option keeps are scrubbed.

Three gaps found by a PHI hunt; each planted marker came out of de-identification before the fix:

* identifiers held only in sequence items (Other Patient IDs, a Referenced Patient item, Request
  Attributes, an unlisted person name two items deep) were not collected, only the top level was;
* dates the Modified Dates option shifts were not collected, so "MR BRAIN 20190312" kept the original
  date next to a shifted Study Date; and only the DICOM form of a date was, never 12/03/2019;
* name components of two characters were ignored (the rule was three), which is most CJK names:
  山田^太郎, 王^伟, 김^민수.

Ordinary descriptor words, short Latin ones (MR, WO, T1) included, are kept.
"""

from __future__ import annotations

import pytest
from deid_corpus import item
from deid_keys import ALL_OPTIONS
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import read_instance, write_instance
from enclave_deid.policy import DeidPolicy
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

TENANT = "tenant-a"
CLEAN = DeidPolicy(clean_descriptors=True)
CLEAN_MODIFIED_DATES = DeidPolicy(clean_descriptors=True, retain_longitudinal_modified_dates=True)
POLICIES = {
    "clean descriptors": CLEAN,
    "with modified dates": CLEAN_MODIFIED_DATES,
    "all options": ALL_OPTIONS,
}


def _base(charset: str | list[str] = "ISO_IR 100", transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.PatientName = "SMITHSON^JOHANNA"
    ds.PatientID = "MRN-0042"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.872"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.871"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.99.873"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds


def _deidentify(ds: Dataset, keys, policy: DeidPolicy) -> tuple[bytes, Dataset]:
    parsed = read_instance(write_instance(ds))
    out = write_instance(deidentify(parsed, policy, keys, DeidContext(TENANT)).dataset)
    return out, read_instance(out)


def _sequence_identifiers_instance(transfer_syntax: str) -> Dataset:
    ds = _base(transfer_syntax=transfer_syntax)
    ds.OtherPatientIDsSequence = Sequence(
        [item(PatientID="QXOTHER-30551", IssuerOfPatientID="QXSAINTJUDE", TypeOfPatientID="TEXT")]
    )
    # Not what the module puts there, but what a sender may: a copy of the patient's identity.
    ds.ReferencedPatientSequence = Sequence([item(PatientName="QUIMBY^ZEBEDEE", PatientID="QXREF-4471")])
    ds.RequestAttributesSequence = Sequence(
        [
            item(
                AccessionNumber="QXACC8812",
                RequestedProcedureID="QXRP-5510",
                ScheduledProcedureStepID="QXSPS-6620",
                RequestedProcedureDescription="MR BRAIN for QXACC8812",
            )
        ]
    )
    ds.EvaluatorSequence = Sequence(  # unlisted sequence, unlisted PN: removed by VR
        [item(EvaluatorSequence=Sequence([item(EvaluatorName="VOSKUIJLEN^ANNEKE")]))]
    )
    ds.StudyDescription = "MR BRAIN QXOTHER-30551 QXACC8812"
    ds.SeriesDescription = "for Zebedee Quimby, QXRP-5510 (QXSAINTJUDE)"
    ds.ProtocolName = "QXSPS-6620 QXREF-4471"
    ds.ImageComments = "second read: Voskuijlen"
    return ds


@pytest.mark.parametrize(
    "transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"]
)
@pytest.mark.parametrize("policy_name", POLICIES)
def test_identifiers_held_only_in_sequences_are_scrubbed_from_descriptors(
    policy_name: str, transfer_syntax: str, keys
) -> None:
    """Implicit VR too: there the items' elements carry no VR, and the dictionary's is used."""
    out, result = _deidentify(_sequence_identifiers_instance(transfer_syntax), keys, POLICIES[policy_name])
    markers = ("QXOTHER-30551", "QXSAINTJUDE", "QUIMBY", "ZEBEDEE", "QXREF-4471", "QXACC8812")
    for marker in (*markers, "QXRP-5510", "QXSPS-6620", "VOSKUIJLEN"):
        assert marker.encode() not in out.upper(), marker
    assert result.StudyDescription.startswith("MR BRAIN ")
    assert result.SeriesDescription.startswith("for ")
    assert result.ImageComments.startswith("second read: ")
    assert result.RequestAttributesSequence[0].RequestedProcedureDescription.startswith("MR BRAIN for ")


def _dated_instance() -> Dataset:
    ds = _base("ISO_IR 192")
    ds.StudyDate = "20190312"
    ds.SeriesDate = "20190313"
    ds.AcquisitionDateTime = "20190312101112.5+0100"
    ds.RequestAttributesSequence = Sequence(
        [item(ScheduledProcedureStepStartDate="20190301", RequestedProcedureDescription="booked 1.3.2019")]
    )
    ds.StudyDescription = "MR BRAIN 20190312"
    ds.SeriesDescription = "follow-up of 12/03/2019, prior 2019-03-01"
    ds.ProtocolName = "T1 MPRAGE 13-MAR-2019"
    ds.ImageComments = "acquired March 13, 2019; compare 3/12/19 and 2019年3月1日"
    return ds


@pytest.mark.parametrize("policy_name", POLICIES)
def test_dates_do_not_survive_in_descriptors(policy_name: str, keys) -> None:
    """Under Modified Dates the dates are shifted, and an original left in a description would undo the
    shift; without a date option they are removed, and a description must not keep them either."""
    out, result = _deidentify(_dated_instance(), keys, POLICIES[policy_name])
    for written in ("20190312", "20190313", "20190301", "12/03/2019", "2019-03-01", "13-MAR-2019"):
        assert written.encode() not in out, written
    for written in ("March 13, 2019", "3/12/19", "1.3.2019", "2019年3月1日"):
        assert written.encode("utf-8") not in out, written
    assert result.StudyDescription.startswith("MR BRAIN")
    assert result.ProtocolName.startswith("T1 MPRAGE")
    assert result.SeriesDescription.startswith("follow-up of ")
    if POLICIES[policy_name].retain_longitudinal_modified_dates:
        assert result.StudyDate not in ("", "20190312") and len(result.StudyDate) == 8


def test_cjk_names_are_scrubbed_by_component_group(keys) -> None:
    ds = _base("ISO_IR 192")
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.ReferringPhysicianName = "王^伟"
    ds.PerformingPhysicianName = "김^민수"
    ds.StudyDescription = "山田太郎様 頭部MRI"
    ds.SeriesDescription = "太郎 山田 造影なし"
    ds.ProtocolName = "王伟 头部CT"
    ds.ImageComments = "김민수 판독, 민수"
    out, result = _deidentify(ds, keys, CLEAN)
    for name in ("山田", "太郎", "王伟", "김민수", "민수"):
        assert name.encode("utf-8") not in out, name
    assert "頭部MRI" in result.StudyDescription
    assert "造影なし" in result.SeriesDescription
    assert "头部CT" in result.ProtocolName
    assert "판독" in result.ImageComments


def test_a_japanese_name_in_a_sequence_is_scrubbed_under_iso_2022(keys) -> None:
    """ISO 2022 IR 87 (JIS X 0208, escape sequences), the encoding of pydicom's chrJapMulti; the name is
    only in a sequence item, which is decoded with the instance's character set."""
    ds = _base(["", "ISO 2022 IR 87"])
    ds.ReferencedPatientSequence = Sequence([item(PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう")])
    ds.StudyDescription = "山田 太郎 頭部MRI"
    ds.SeriesDescription = "Tarou Yamada 造影なし"
    _, result = _deidentify(ds, keys, CLEAN)
    assert "山田" not in result.StudyDescription and "太郎" not in result.StudyDescription
    assert "頭部MRI" in result.StudyDescription
    assert "YAMADA" not in result.SeriesDescription.upper()
    assert "TAROU" not in result.SeriesDescription.upper()
    assert "造影なし" in result.SeriesDescription


@pytest.mark.parametrize("policy_name", POLICIES)
def test_ordinary_descriptions_are_kept_whole(policy_name: str, keys) -> None:
    """Names with short Latin components (Ng^Wo), ids and dates of the instance leave ordinary descriptor
    words alone, the short ones (MR, WO, T1, AX) included, and a written date that is not theirs."""
    ds = _base()
    ds.PatientName = "NG^WO"
    ds.ReferringPhysicianName = "LI^MR"
    ds.PatientID = "12345678"
    ds.AccessionNumber = "A77"
    ds.StudyDate = "20190312"
    ds.StudyDescription = "MR BRAIN WO CONTRAST"
    ds.SeriesDescription = "AX T2 FLAIR 5mm 2019"
    ds.ProtocolName = "T1 3D 1mm ISO"
    ds.ImageComments = "protocol of 2021-05-01, 12/03/2018"
    _, result = _deidentify(ds, keys, POLICIES[policy_name])
    assert result.StudyDescription == "MR BRAIN WO CONTRAST"
    assert result.SeriesDescription == "AX T2 FLAIR 5mm 2019"
    assert result.ProtocolName == "T1 3D 1mm ISO"
    assert result.ImageComments == "protocol of 2021-05-01, 12/03/2018"
