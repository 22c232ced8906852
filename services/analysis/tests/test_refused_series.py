"""Series whose attributes cannot give a brain volume are refused with a reason when the volume is
built (or, for the field of view, before ANTs runs), not analysed. Found by an adversarial hunt:
PixelSpacing ``0\\0`` failed in ITK's ``set_spacing``, a RescaleSlope of ``1e308`` in registration
("Total Mass of the image was zero"), a non-numeric one in ``float()``, each as an unexpected error
three times over (``analysis_internal_error`` after ~3 minutes). A RescaleSlope of 0 was taken as 1
and the analysis completed on intensities the data does not state, and a series whose instances
belong to two patients was analysed as one volume."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from enclave_analysis.errors import MixedPatientsError, PixelValueError, SeriesGeometryError
from enclave_analysis.phantoms import write_mr_series
from enclave_analysis.segmentation import segment_brain
from enclave_analysis.volume import Volume, build_volume
from highdicom.legacy import LegacyConvertedEnhancedMRImage
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag


def _volume(shape=(12, 10, 9), spacing=(0.9, 1.1, 2.0)) -> Volume:
    voxels = np.random.default_rng(3).uniform(0, 800, shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-40.0, 12.5, 30.0]
    return Volume(voxels=voxels, affine_ras=affine)


@pytest.fixture
def series() -> list[pydicom.Dataset]:
    return write_mr_series(_volume(), patient_name="Doe^Jane", patient_id="PSEUDO-PATIENT-1")


# ---- voxel size ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spacing", "shown"),
    [
        (["0", "0"], "0\\0"),
        (["-1.1", "0.9"], "-1.1\\0.9"),  # a negative spacing mirrors the image
        (["0.0001", "0.0001"], "0.0001\\0.0001"),
        (["1e9", "1e9"], "1e+09\\1e+09"),
        (["0.9", "25"], "0.9\\25"),
    ],
)
def test_a_pixel_spacing_no_brain_series_has_is_a_geometry_failure(series, spacing, shown) -> None:
    for ds in series:
        ds.PixelSpacing = spacing
    with pytest.raises(SeriesGeometryError) as failed:
        build_volume(series)
    assert failed.value.code == "series_geometry"
    assert failed.value.reason.startswith("PixelSpacing of instance ")
    assert f"is {shown} mm; each value must be between 0.05 and 20 mm" in failed.value.reason


@pytest.mark.parametrize("slice_spacing", [25.0, 0.01])
def test_slices_too_far_apart_or_too_close_are_a_geometry_failure(slice_spacing) -> None:
    series = write_mr_series(_volume(spacing=(0.9, 1.1, slice_spacing)))
    with pytest.raises(SeriesGeometryError) as failed:
        build_volume(series)
    assert failed.value.reason == (
        f"slices are {slice_spacing:.3g} mm apart (from ImagePositionPatient); the spacing between "
        "slices must be between 0.05 and 20 mm"
    )


def test_the_pixel_spacing_of_an_enhanced_frame_is_checked(series) -> None:
    enhanced = _enhanced(series)
    enhanced.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = ["0", "0"]
    with pytest.raises(SeriesGeometryError, match="PixelSpacing of frame 0 of enhanced instance 0 is 0"):
        build_volume([enhanced])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("spacing", "field"), [(40.0, "640 x 640 x 640"), (0.1, "2 x 2 x 2")])
def test_a_field_of_view_no_brain_series_has_is_refused_before_ants_runs(spacing, field) -> None:
    """A 1.3 m field ran for over 10 minutes and 3.6 GB in the pipeline; a 1.5 mm one failed inside it
    with an IndexError. Both are refused before ANTs is even imported."""
    volume = Volume(
        voxels=np.random.default_rng(0).uniform(0, 1, (16, 16, 16)).astype(np.float32),
        affine_ras=np.diag([spacing, spacing, spacing, 1.0]),
    )
    with pytest.raises(SeriesGeometryError) as failed:
        segment_brain(volume)
    assert failed.value.reason.startswith(f"the field of view is {field} mm")
    assert "between 20 and 500 mm along each axis" in failed.value.reason


# ---- rescale ------------------------------------------------------------------------------------


def test_a_rescale_slope_of_zero_is_refused_not_taken_as_one(series) -> None:
    series[0].RescaleSlope = "0"
    with pytest.raises(PixelValueError) as failed:
        build_volume(series)
    assert failed.value.code == "pixel_values_invalid"
    assert failed.value.reason.startswith(
        "RescaleSlope of instance 0 is 0, which gives every voxel the value of RescaleIntercept"
    )


def test_without_a_rescale_slope_the_stored_values_are_used_as_they_are(series) -> None:
    for ds in series:
        del ds.RescaleSlope
        ds.RescaleIntercept = ""  # empty: the identity too
    volume = build_volume(series)
    stored = np.stack([ds.pixel_array.T for ds in series], axis=-1)
    np.testing.assert_array_equal(volume.voxels, stored.astype(np.float32))


@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # pydicom, on setting the value
@pytest.mark.parametrize(
    ("keyword", "value", "problem"),
    [
        ("RescaleSlope", "inf", "RescaleSlope of instance 2 is not finite"),
        ("RescaleSlope", "nan", "RescaleSlope of instance 2 is not finite"),
        ("RescaleIntercept", "-inf", "RescaleIntercept of instance 2 is not finite"),
    ],
)
def test_a_rescale_attribute_that_is_not_finite_is_refused(series, keyword, value, problem) -> None:
    setattr(series[2], keyword, value)
    with pytest.raises(PixelValueError) as failed:
        build_volume(series)
    assert failed.value.reason == f"{problem}; a finite decimal value is required"


def test_a_rescale_slope_that_is_not_a_number_is_refused_without_quoting_it(series) -> None:
    """As read from a file: pydicom keeps DS text it cannot convert as text."""
    series[1][0x00281053] = RawDataElement(Tag(0x00281053), "DS", 8, b"Doe^Jane", 0, False, True)
    with pytest.raises(PixelValueError) as failed:
        build_volume(series)
    assert failed.value.reason == "RescaleSlope of instance 1 is not a number; one decimal value is required"


@pytest.mark.parametrize(("slope", "intercept"), [("1e308", "0"), ("1", "1e39"), ("1e36", "-1e36")])
def test_rescaled_values_beyond_32_bit_floats_are_refused(series, slope, intercept) -> None:
    for ds in series:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    with pytest.raises(PixelValueError) as failed:
        build_volume(series)
    assert failed.value.reason.startswith(
        "RescaleSlope and RescaleIntercept turn the stored values of slice "
    )
    assert "exceed 32-bit floating point (3.4e38)" in failed.value.reason


def test_a_large_but_finite_rescale_is_kept(series) -> None:
    """The pipeline is scale-invariant (the phantom gave the same volumes scaled by 1e-30 and 1e30)."""
    for ds in series:
        ds.RescaleSlope, ds.RescaleIntercept = "1e30", "0"
    volume = build_volume(series)
    assert np.all(np.isfinite(volume.voxels)) and float(volume.voxels.max()) > 1e33


def test_the_rescale_of_an_enhanced_frame_is_checked(series) -> None:
    enhanced = _enhanced(series)
    enhanced.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope = "0"
    with pytest.raises(PixelValueError, match="RescaleSlope of frame 0 of enhanced instance 0 is 0"):
        build_volume([enhanced])


def test_a_volume_with_one_value_in_every_voxel_is_refused(series) -> None:
    for ds in series:
        ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype=np.uint16).tobytes()
    with pytest.raises(PixelValueError, match="every voxel of the volume has the same value"):
        build_volume(series)


# ---- one patient --------------------------------------------------------------------------------


def test_instances_of_two_patients_are_not_built_into_one_volume(series) -> None:
    """De-identified copies carry a pseudonymous PatientID per patient; two in one series means two
    people's instances share a series UID (the series key is derived from it alone)."""
    for ds in series[4:]:
        ds.PatientID = "PSEUDO-PATIENT-2"
    with pytest.raises(MixedPatientsError) as failed:
        build_volume(series)
    assert failed.value.code == "series_mixed_patients"
    assert failed.value.reason.startswith(
        "the instances of this series belong to 2 different patients (their PatientID differs)"
    )
    assert "PSEUDO-PATIENT" not in failed.value.reason and "Doe" not in failed.value.reason


def test_without_any_patient_id_the_patient_name_tells_patients_apart(series) -> None:
    for ds in series:
        del ds.PatientID
    series[0].PatientName = "Roe^Richard"
    with pytest.raises(MixedPatientsError, match=r"2 different patients \(their PatientName differs\)"):
        build_volume(series)


def test_one_patient_id_with_an_instance_lacking_it_is_one_patient(series) -> None:
    del series[3].PatientID
    series[5].PatientID = ""
    series[6].PatientName = "Doe^J"  # the ID decides, not the name
    assert build_volume(series).shape == (12, 10, 9)


def _enhanced(series: list[pydicom.Dataset]) -> pydicom.Dataset:
    return LegacyConvertedEnhancedMRImage(
        legacy_datasets=series,
        series_instance_uid=series[0].SeriesInstanceUID,
        series_number=3,
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
        instance_number=1,
    )
