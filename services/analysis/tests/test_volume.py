"""Series assembly: ordering, rescaling, geometry checks and enhanced multi-frame MR."""

from __future__ import annotations

import numpy as np
import pytest
from enclave_analysis.errors import SeriesGeometryError
from enclave_analysis.phantoms import write_mr_series
from enclave_analysis.volume import Volume, build_volume
from highdicom.legacy import LegacyConvertedEnhancedMRImage


def _oblique_volume(shape=(12, 10, 9), spacing=(0.9, 1.1, 2.0)) -> Volume:
    rng = np.random.default_rng(3)
    voxels = rng.uniform(0, 800, shape).astype(np.float32)
    angle = np.radians(17.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = [-40.0, 12.5, 30.0]
    return Volume(voxels=voxels, affine_ras=affine)


@pytest.fixture
def volume() -> Volume:
    return _oblique_volume()


@pytest.fixture
def series(volume) -> list:
    return write_mr_series(volume)


def test_round_trip_restores_voxels_and_affine(volume, series):
    built = build_volume(series)
    np.testing.assert_allclose(built.affine_ras, volume.affine_ras, atol=1e-5)
    step = (volume.voxels.max() - volume.voxels.min()) / 65000.0
    np.testing.assert_allclose(built.voxels, volume.voxels, atol=step)
    assert built.spacing_mm == pytest.approx((0.9, 1.1, 2.0), abs=1e-6)


def test_order_comes_from_positions_not_instance_numbers(series):
    forward = build_volume(series)
    shuffled = [series[n] for n in np.random.default_rng(1).permutation(len(series))]
    for number, ds in enumerate(shuffled):
        ds.InstanceNumber = number + 1
    for candidate in (build_volume(series[::-1]), build_volume(shuffled)):
        np.testing.assert_array_equal(candidate.voxels, forward.voxels)
        np.testing.assert_array_equal(candidate.affine_ras, forward.affine_ras)


def test_duplicate_delivery_of_an_instance_is_ignored(series):
    built = build_volume([*series, series[3], series[3]])
    assert built.shape[2] == len(series)


def test_rescale_slope_and_intercept_are_applied(series):
    ds = series[0]
    raw = ds.pixel_array.astype(np.float64)
    built = build_volume(series)
    expected = raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    k = int(
        np.argmin(
            [
                float(
                    np.asarray(s.ImagePositionPatient, float)
                    @ np.cross(
                        np.asarray(s.ImageOrientationPatient[:3], float),
                        np.asarray(s.ImageOrientationPatient[3:], float),
                    )
                )
                for s in series
            ]
        )
    )
    assert k == 0
    np.testing.assert_allclose(built.voxels[:, :, 0], expected.T, rtol=1e-5)


def test_missing_middle_slice_fails_with_position_and_spacing(series):
    heights = [float(ds.SliceLocation) for ds in series]
    del series[4]
    with pytest.raises(SeriesGeometryError) as failure:
        build_volume(series)
    assert failure.value.reason == (
        f"missing slice between positions {heights[3]:.1f} and {heights[5]:.1f} mm (spacing 2.0 mm)"
    )


def test_two_missing_slices_are_counted(series):
    del series[4:6]
    with pytest.raises(SeriesGeometryError, match="2 missing slices between"):
        build_volume(series)


def test_non_uniform_spacing_is_rejected(series):
    position = [float(v) for v in series[5].ImagePositionPatient]
    normal = np.cross(
        np.asarray(series[5].ImageOrientationPatient[:3], float),
        np.asarray(series[5].ImageOrientationPatient[3:], float),
    )
    series[5].ImagePositionPatient = list(np.asarray(position) + 0.7 * normal)
    with pytest.raises(SeriesGeometryError, match="non-uniform slice spacing"):
        build_volume(series)


def test_gantry_tilt_is_rejected(series):
    row = np.asarray(series[0].ImageOrientationPatient[:3], float)
    for k, ds in enumerate(series):
        ds.ImagePositionPatient = list(np.asarray(ds.ImagePositionPatient, float) + 0.35 * k * row)
    with pytest.raises(SeriesGeometryError, match="gantry tilt"):
        build_volume(series)


def test_mixed_orientation_is_rejected(series):
    series[2].ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    with pytest.raises(SeriesGeometryError, match="mixed orientations"):
        build_volume(series)


def test_mixed_pixel_spacing_and_matrix_are_rejected(series, volume):
    series[1].PixelSpacing = [1.5, 1.5]
    with pytest.raises(SeriesGeometryError, match="different pixel spacings"):
        build_volume(series)
    other = write_mr_series(volume)
    other[1].Rows = 11
    with pytest.raises(SeriesGeometryError, match="different matrix sizes"):
        build_volume(other)


def test_missing_geometry_attribute_is_named(series):
    del series[0].ImageOrientationPatient
    with pytest.raises(SeriesGeometryError, match="lacks ImageOrientationPatient"):
        build_volume(series)


def test_two_series_are_rejected(series, volume):
    with pytest.raises(SeriesGeometryError, match="2 different series"):
        build_volume([*series, write_mr_series(volume)[0]])


def test_error_messages_carry_no_phi(series):
    del series[4]
    with pytest.raises(SeriesGeometryError) as failure:
        build_volume(series)
    for value in (str(series[0].PatientName), series[0].PatientID, series[0].SeriesInstanceUID):
        assert value not in failure.value.reason


def test_enhanced_multiframe_mr_matches_single_frame(series):
    enhanced = LegacyConvertedEnhancedMRImage(
        legacy_datasets=series[::-1],
        series_instance_uid=series[0].SeriesInstanceUID,
        series_number=3,
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1",
        instance_number=1,
    )
    assert "PerFrameFunctionalGroupsSequence" in enhanced
    from_frames = build_volume([enhanced])
    from_slices = build_volume(series)
    np.testing.assert_allclose(from_frames.affine_ras, from_slices.affine_ras, atol=1e-6)
    np.testing.assert_allclose(from_frames.voxels, from_slices.voxels, rtol=1e-6)
