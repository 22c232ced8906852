"""Quarantine rule for burned-in text (PS3.15 E.3.1 criteria)."""

from __future__ import annotations

import pytest
from enclave_deid.burned_in import assess_burned_in_risk
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

WSI = "1.2.840.10008.5.1.4.1.1.77.1.6"


def _ds(**attributes: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.Modality = "MR"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_plain_mr_is_released() -> None:
    assert assess_burned_in_risk(_ds()) is None


def test_burned_in_annotation_yes_is_quarantined_even_for_mr() -> None:
    assert assess_burned_in_risk(_ds(BurnedInAnnotation="YES")) == "BurnedInAnnotation is YES"


@pytest.mark.parametrize(
    "attributes",
    [
        {"Modality": "US"},
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7", "Modality": "OT"},
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7.4", "Modality": "MR"},
        {"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]},
        {"ConversionType": "WSD"},
        # Sixteenth session (conformance review): kinds released with their pixels as they were.
        {"SOPClassUID": WSI, "Modality": "SM", "ImageType": ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]},
        {"SOPClassUID": WSI, "Modality": "SM", "ImageType": ["ORIGINAL", "PRIMARY", "OVERVIEW", "NONE"]},
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.5.1", "Modality": "OP"},
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.77.1.5.2", "Modality": ""},
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.6.1", "Modality": ""},  # Ultrasound, no Modality
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.3.1", "Modality": "MR"},  # US multi-frame, wrong one
        {"SOPClassUID": "1.2.840.10008.5.1.1.29", "Modality": "MR"},  # Hardcopy Grayscale
        {"SOPClassUID": "1.2.840.10008.5.1.1.30", "Modality": "MR"},  # Hardcopy Color
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.104.1", "Modality": "MR"},  # Encapsulated PDF
    ],
)
def test_kinds_at_risk_are_quarantined_unless_verified_clean(attributes) -> None:
    reason = assess_burned_in_risk(_ds(**attributes))
    assert reason is not None
    assert "not verified clean" in reason
    half = _ds(**attributes, BurnedInAnnotation="NO")
    assert assess_burned_in_risk(half) is not None
    clean = _ds(**attributes, BurnedInAnnotation="NO", RecognizableVisualFeatures="NO")
    assert assess_burned_in_risk(clean) is None


def test_reason_carries_no_identifying_value() -> None:
    reason = assess_burned_in_risk(_ds(Modality="US", PatientName="SMITHSON^JOHANNA"))
    assert reason is not None
    assert "SMITHSON" not in reason


def test_a_whole_slide_volume_is_released_and_a_label_in_its_pixels_is_not() -> None:
    volume = _ds(SOPClassUID=WSI, Modality="SM", ImageType=["ORIGINAL", "PRIMARY", "VOLUME", "NONE"])
    assert assess_burned_in_risk(volume) is None
    volume.SpecimenLabelInImage = "YES"
    volume.BurnedInAnnotation, volume.RecognizableVisualFeatures = "NO", "NO"
    assert assess_burned_in_risk(volume) == (
        "SpecimenLabelInImage is YES (the slide label, with its identifiers, is in the pixels)"
    )


def test_a_modality_that_cannot_be_read_raises_rather_than_passing() -> None:
    """Modality written as FD with 6 bytes: pydicom raises on reading it. The pipeline turns the error
    into an ``unsupported_instance`` quarantine (test_service)."""
    ds = _ds()
    ds[0x00080060] = RawDataElement(BaseTag(0x00080060), "FD", 6, b"\x00" * 6, 0, False, True, True, False)
    with pytest.raises(Exception):  # noqa: B017, PT011  (pydicom's BytesLengthException)
        assess_burned_in_risk(ds)
