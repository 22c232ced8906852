"""A volume past the voxel budget is reduced in-plane by block averaging, not refused: routine 512x512
T1s (GE BRAVO ZIP512, interpolated MPRAGE: 512x512x176, 46 M voxels) were refused as
``series_too_large`` though the analysis registers on a 2 mm grid. The slices are averaged in f x f
blocks (the smallest f up to 4 that fits) as they are decoded; the geometry follows exactly."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from enclave_analysis.errors import SeriesTooLargeError
from enclave_analysis.phantoms import write_mr_series
from enclave_analysis.volume import LPS_TO_RAS, Volume, VolumeLimits, build_volume

UNLIMITED = VolumeLimits(max_voxels=2**40)


def _rotation(degrees: float, axis: tuple[float, float, float]) -> np.ndarray:
    """Rodrigues' rotation about ``axis``."""
    u = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    t = np.radians(degrees)
    k = np.array([[0, -u[2], u[1]], [u[2], 0, -u[0]], [-u[1], u[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def _oblique_series(shape: tuple[int, int, int], spacing=(0.9, 1.1, 2.0)) -> list[pydicom.Dataset]:
    """A series rotated 30 degrees about an oblique axis, with stored values 0..n-1 (slope 1), so
    every block mean is exact."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(30.0, (1.0, 2.0, 3.0)) @ np.diag(spacing)
    affine[:3, 3] = (-40.0, 25.0, 10.0)
    voxels = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    series = write_mr_series(Volume(voxels=voxels, affine_ras=affine))
    for k, ds in enumerate(series):
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(voxels[:, :, k].T.astype(np.uint16)).tobytes()
    return series


def _block_means(voxels: np.ndarray, f: int) -> np.ndarray:
    i, j = voxels.shape[0] // f, voxels.shape[1] // f
    cropped = voxels[: i * f, : j * f].astype(np.float64)
    return cropped.reshape(i, f, j, f, voxels.shape[2]).mean(axis=(1, 3)).astype(np.float32)


def _check_reduced(series: list[pydicom.Dataset], limits: VolumeLimits, f: int) -> Volume:
    full = build_volume(series, UNLIMITED)
    reduced = build_volume(series, limits)
    columns, rows, slices = full.shape
    assert reduced.shape == (columns // f, rows // f, slices)
    assert (reduced.in_plane_reduction, full.in_plane_reduction) == (f, 1)
    np.testing.assert_array_equal(reduced.voxels, _block_means(full.voxels, f))
    # spacing x f in-plane, the slice axis unchanged
    np.testing.assert_allclose(reduced.affine_ras[:3, :2], f * full.affine_ras[:3, :2], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(reduced.affine_ras[:3, 2], full.affine_ras[:3, 2])
    # the first voxel at the centre of the first block: (f-1)/2 original voxels along i and j
    centre = full.affine_ras @ np.array([(f - 1) / 2, (f - 1) / 2, 0.0, 1.0])
    np.testing.assert_allclose(reduced.affine_ras[:, 3], centre, rtol=0, atol=1e-9)
    # and every reduced voxel at the centre of its block
    corner = full.affine_ras @ np.array([f * 1.0, f * 2.0, 1.0, 1.0])
    block_centre = np.mean(
        [full.affine_ras @ np.array([f + a, 2 * f + b, 1.0, 1.0]) for a in range(f) for b in range(f)], axis=0
    )
    np.testing.assert_allclose(reduced.affine_ras @ np.array([1.0, 2.0, 1.0, 1.0]), block_centre, atol=1e-9)
    assert not np.allclose(corner, block_centre)
    return reduced


def test_twice_the_budget_is_halved_in_plane_with_exact_block_means_and_geometry() -> None:
    series = _oblique_series((8, 8, 4))  # 256 voxels; halved in-plane: 64
    reduced = _check_reduced(series, VolumeLimits(max_voxels=128), 2)
    assert reduced.shape == (4, 4, 4)
    # stored value 32i + 4j + k at voxel (i, j, k): the 2x2 block (I, J) averages 64I + 8J + 18 + k
    i, j, k = np.meshgrid(np.arange(4), np.arange(4), np.arange(4), indexing="ij")
    np.testing.assert_array_equal(reduced.voxels, (64 * i + 8 * j + 18 + k).astype(np.float32))
    np.testing.assert_allclose(reduced.spacing_mm, (1.8, 2.2, 2.0), atol=1e-6)
    # the origin moved by half an original voxel along each (rotated) direction cosine
    row_dir = LPS_TO_RAS[:3, :3] @ np.array([float(v) for v in series[0].ImageOrientationPatient[:3]])
    col_dir = LPS_TO_RAS[:3, :3] @ np.array([float(v) for v in series[0].ImageOrientationPatient[3:]])
    first = min(series, key=lambda ds: int(ds.InstanceNumber))
    origin = LPS_TO_RAS[:3, :3] @ np.array([float(v) for v in first.ImagePositionPatient])
    assert abs(row_dir[0]) < 0.99 and abs(col_dir[1]) < 0.99  # not axis-aligned
    np.testing.assert_allclose(
        reduced.affine_ras[:3, 3], origin + 0.5 * 0.9 * row_dir + 0.5 * 1.1 * col_dir, atol=1e-6
    )


def test_an_odd_matrix_drops_the_last_rows_and_columns_that_fill_no_block() -> None:
    series = _oblique_series((9, 7, 3))  # 189 voxels; halved: 4x3x3 = 36
    reduced = _check_reduced(series, VolumeLimits(max_voxels=60), 2)
    assert reduced.shape == (4, 3, 3)


def test_a_third_when_half_is_not_enough() -> None:
    series = _oblique_series((9, 9, 2))  # 162 voxels; by 2: 32, by 3: 18
    reduced = _check_reduced(series, VolumeLimits(max_voxels=20), 3)
    assert reduced.shape == (3, 3, 2)
    np.testing.assert_allclose(reduced.spacing_mm, (2.7, 3.3, 2.0), atol=1e-6)


def test_a_volume_past_the_budget_even_reduced_by_4_is_refused() -> None:
    series = _oblique_series((8, 8, 2))  # 128 voxels; by 4: 8
    assert build_volume(series, VolumeLimits(max_voxels=8)).shape == (2, 2, 2)
    with pytest.raises(SeriesTooLargeError) as refused:
        build_volume(series, VolumeLimits(max_voxels=7))
    assert refused.value.code == "series_too_large"
    assert "2 slices of 8x8 make a volume of 128 voxels, more than 7 even reduced in-plane by 4" in (
        refused.value.reason
    )


def test_a_volume_within_the_budget_is_not_changed() -> None:
    series = _oblique_series((9, 7, 3))
    at = build_volume(series, VolumeLimits(max_voxels=189))
    unlimited = build_volume(series, UNLIMITED)
    expected = np.stack(
        [ds.pixel_array.astype(np.float32).T for ds in sorted(series, key=lambda ds: int(ds.InstanceNumber))],
        axis=2,
    )
    for volume in (at, unlimited):
        assert volume.shape == (9, 7, 3)
        assert volume.in_plane_reduction == 1
        np.testing.assert_array_equal(volume.voxels, expected)
    np.testing.assert_array_equal(at.affine_ras, unlimited.affine_ras)
    first = min(series, key=lambda ds: int(ds.InstanceNumber))
    origin = LPS_TO_RAS[:3, :3] @ np.array([float(v) for v in first.ImagePositionPatient])
    np.testing.assert_array_equal(at.affine_ras[:3, 3], origin)
    np.testing.assert_allclose(at.spacing_mm, (0.9, 1.1, 2.0), atol=1e-6)


def test_an_enhanced_instance_is_reduced_per_frame() -> None:
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    series = _oblique_series((8, 8, 4))
    enhanced = LegacyConvertedEnhancedMRImage(
        series,
        series_instance_uid=series[0].SeriesInstanceUID,
        series_number=9,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    classic = build_volume(series, VolumeLimits(max_voxels=128))
    reduced = build_volume([enhanced], VolumeLimits(max_voxels=128))
    assert reduced.shape == (4, 4, 4) and reduced.in_plane_reduction == 2
    np.testing.assert_array_equal(reduced.voxels, classic.voxels)
    np.testing.assert_allclose(reduced.affine_ras, classic.affine_ras, atol=1e-6)
