"""Quarantine rule for burned-in text (PS3.15 E.3.1 criteria)."""

from __future__ import annotations

import pytest
from enclave_deid.burned_in import assess_burned_in_risk
from pydicom.dataset import Dataset


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
