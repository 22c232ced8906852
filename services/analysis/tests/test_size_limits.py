"""A series is bounded in size before anything is decoded or allocated. Found by a security hunt:
eight JPEG 2000 slices declaring 4096x4096 (30 KB on the wire) took the worker from 600 to 1,701 MiB
before the field of view was refused; RLE segments decoding to 256 MiB each for a 64x64 frame (pydicom
decodes a segment whole, then cuts it); three deflated members of 200 MiB pixel data each (3.6 MiB on
the wire) peaked at 2.6 GiB in the service and 3.6 GiB in the worker; and slice positions whose gaps
overflow (z = -1e308, 1e308) failed with an OverflowError three times over.

The datasets here declare large matrices with tiny pixel data: the bounds are checked from the
attributes, so the tests stay small (and a decode of them would fail, not allocate)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pydicom
import pytest
from enclave_analysis.errors import PixelDataError, SeriesGeometryError, SeriesTooLargeError
from enclave_analysis.handlers import ByteBudget, member_size, read_member
from enclave_analysis.phantoms import write_mr_series
from enclave_analysis.volume import Volume, VolumeLimits, build_volume, rle_decoded_length
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, RLELossless


def _series(shape: tuple[int, int, int] = (12, 10, 9), spacing=(0.9, 1.1, 2.0)) -> list[pydicom.Dataset]:
    voxels = np.random.default_rng(3).uniform(0, 800, shape).astype(np.float32)
    affine = np.diag([*spacing, 1.0])
    return write_mr_series(Volume(voxels=voxels, affine_ras=affine))


def _declare(series: list[pydicom.Dataset], rows: int, columns: int, spacing: float = 0.1) -> None:
    """Huge Rows and Columns, the pixel data left as it is (a decode would fail, not allocate)."""
    for ds in series:
        ds.Rows, ds.Columns, ds.PixelSpacing = rows, columns, [spacing, spacing]


# ---- matrix per slice ---------------------------------------------------------------------------


def test_a_matrix_at_the_limit_is_taken_and_one_past_it_refused_before_decoding() -> None:
    limits = VolumeLimits(max_matrix=1024, max_voxels=2**40)
    at = _series()
    _declare(at, 1024, 1024)
    # At the limit: the checks pass and decoding is reached (the tiny pixel data fails there).
    with pytest.raises(PixelDataError, match="cannot be decoded"):
        build_volume(at, limits)
    past = _series()
    _declare(past, 1025, 64)
    with pytest.raises(SeriesTooLargeError) as refused:
        build_volume(past, limits)
    assert refused.value.code == "series_too_large"
    assert "1025x64" in refused.value.reason and "at most 1024 rows and columns" in refused.value.reason


def test_the_hunt_s_4096_matrix_is_refused_with_the_default_limits() -> None:
    series = _series()
    _declare(series, 4096, 4096, spacing=0.05)
    with pytest.raises(SeriesTooLargeError, match="4096x4096"):
        build_volume(series)


def test_an_enhanced_instance_s_matrix_is_bounded_too() -> None:
    from highdicom.legacy import LegacyConvertedEnhancedMRImage

    series = _series()
    enhanced = LegacyConvertedEnhancedMRImage(
        series,
        series_instance_uid=series[0].SeriesInstanceUID,
        series_number=9,
        sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1,
    )
    enhanced.Rows = 2048
    with pytest.raises(SeriesTooLargeError, match="enhanced instance 0 has a matrix of 2048x"):
        build_volume([enhanced], VolumeLimits(max_matrix=1024))


# ---- voxels of the volume -----------------------------------------------------------------------


def test_the_volume_s_voxels_at_the_limit_are_taken_and_one_past_reduced_in_plane() -> None:
    """Past the budget the volume is reduced in-plane (test_in_plane_reduction.py); refused only when
    a reduction by 4 does not fit either."""
    series = _series()  # 9 slices of 10 rows x 12 columns: 1080 voxels
    assert build_volume(series, VolumeLimits(max_voxels=1080)).shape == (12, 10, 9)
    assert build_volume(series, VolumeLimits(max_voxels=1079)).shape == (6, 5, 9)
    assert build_volume(series, VolumeLimits(max_voxels=54)).shape == (3, 2, 9)  # by 4
    with pytest.raises(SeriesTooLargeError) as refused:
        build_volume(series, VolumeLimits(max_voxels=53))
    assert (
        "9 slices of 10x12 make a volume of 1,080 voxels, more than 53 even reduced" in refused.value.reason
    )


def test_the_default_voxel_budget_reduces_a_zip512_t1_and_refuses_past_a_reduction_by_4() -> None:
    """512x512x176 (GE BRAVO ZIP512, 46 M voxels) was refused; halved in-plane it fits and reaches the
    decoding (which fails on the tiny data). 1024x1024 slices pass the matrix bound; 385 of them do not
    fit even reduced by 4 (256x256x385 > 24 Mi) and are refused before anything is decoded."""
    series = _series(shape=(12, 10, 176), spacing=(0.9, 1.1, 1.0))
    _declare(series, 512, 512, spacing=0.47)
    with pytest.raises(PixelDataError, match="cannot be decoded"):
        build_volume(series)
    series = _series(shape=(12, 10, 385), spacing=(0.9, 1.1, 0.5))
    _declare(series, 1024, 1024, spacing=0.05)
    with pytest.raises(SeriesTooLargeError, match="403,701,760 voxels, more than 25,165,824 even reduced"):
        build_volume(series)
    series = series[:384]  # by 4: exactly 24 Mi voxels
    with pytest.raises(PixelDataError, match="cannot be decoded"):
        build_volume(series)


# ---- field of view, before allocation -----------------------------------------------------------


def test_a_field_of_view_past_500_mm_is_refused_before_anything_is_decoded() -> None:
    series = _series()
    _declare(series, 1000, 1000, spacing=0.5)  # 500 mm: at the limit; decoding is reached
    with pytest.raises(PixelDataError, match="cannot be decoded"):
        build_volume(series)
    _declare(series, 1000, 1001, spacing=0.5)  # 500.5 mm
    with pytest.raises(SeriesGeometryError, match="the field of view is 500 x 500 x 18 mm"):
        build_volume(series)


# ---- RLE segments that decode past their frame --------------------------------------------------


def _rle_segment(length: int, value: int) -> bytes:
    """Replicate runs of 128 bytes, then one run for the rest (PS3.5 G.3.1)."""
    out = bytearray()
    while length > 0:
        run = min(length, 128)
        out += bytes([257 - run if run > 1 else 0]) + bytes([value]) if run > 1 else bytes([0, value])
        length -= run
    return bytes(out)


def _rle_series(decoded: int) -> list[pydicom.Dataset]:
    """A 3-slice 8x8 16-bit RLE series whose segments decode to ``decoded`` bytes each."""
    series = _series(shape=(8, 8, 3), spacing=(3.0, 3.0, 3.0))
    for k, ds in enumerate(series):
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        segments = [_rle_segment(decoded, 0), _rle_segment(decoded, 10 + k)]
        header = struct.pack("<16L", 2, 64, 64 + len(segments[0]), *([0] * 13))
        ds.PixelData = encapsulate([header + b"".join(segments)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = RLELossless
    return series


def test_rle_segments_of_the_frame_s_size_decode() -> None:
    volume = build_volume(_rle_series(64))
    assert volume.shape == (8, 8, 3)
    assert [len(np.unique(volume.voxels[:, :, k])) for k in range(3)] == [1, 1, 1]
    assert len(np.unique(volume.voxels)) == 3


def test_rle_segments_decoding_past_their_frame_are_refused_before_they_are_decoded() -> None:
    # pydicom takes (and cuts) one run of padding; the slack is 128 bytes
    assert build_volume(_rle_series(64 + 128)).shape == (8, 8, 3)
    with pytest.raises(PixelDataError) as refused:
        build_volume(_rle_series(64 + 129))
    assert refused.value.code == "pixel_data_unreadable"
    assert "RLE segment 0 of frame 0 decodes to more than the 64 bytes" in refused.value.reason


def test_the_hunt_s_rle_bomb_is_refused_without_decoding_it() -> None:
    """64x64 frames whose segments decode to 16 MiB each (256 KiB on the wire)."""
    series = _rle_series(64)
    for ds in series:
        ds.Rows = ds.Columns = 64
        ds.PixelSpacing = [1, 1]
        segment = bytes([0x81, 7]) * (2**24 // 128)
        header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
        ds.PixelData = encapsulate([header + segment + segment])
    with pytest.raises(PixelDataError, match="decodes to more than the 4096 bytes"):
        build_volume(series)


def test_the_rle_decoded_length_is_counted_as_pydicom_decodes() -> None:
    from pydicom.pixels.decoders.rle import _rle_decode_segment

    rng = np.random.default_rng(5)
    segment = bytes(rng.integers(0, 256, 5000, dtype=np.uint8))  # arbitrary runs, a ragged end
    assert rle_decoded_length(segment, 10**9) == len(_rle_decode_segment(segment))
    assert rle_decoded_length(bytes([0x80]) * 10, 0) == 0  # no-operation headers
    assert rle_decoded_length(bytes([0x81, 1]) * 1000, 200) <= 200 + 128  # stops past the bound


# ---- slice positions whose gaps are not finite (F7) ---------------------------------------------


def test_slice_gaps_that_overflow_are_a_geometry_failure_not_an_internal_error() -> None:
    series = _series(shape=(12, 10, 4))
    for ds, z in zip(series, (-1e308, 1e308, 1.5e308, 1.7e308), strict=True):
        ds.ImagePositionPatient = [0.0, 0.0, z]
    with pytest.raises(SeriesGeometryError, match="distances are not finite"):
        build_volume(series)


# ---- the bytes of a series' members -------------------------------------------------------------


def _file(ds: pydicom.Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_members_at_the_byte_budget_are_read_and_one_byte_past_it_refused() -> None:
    plain = _file(_series()[0])
    budget = ByteBudget(2 * len(plain))
    read_member(plain, budget)
    read_member(plain, budget)
    assert budget.remaining == 0
    with pytest.raises(SeriesTooLargeError) as refused:
        read_member(plain, ByteBudget(len(plain) - 1))
    assert refused.value.code == "series_too_large"
    assert "ENCLAVE_ANALYSIS_MAX_SERIES_BYTES" in refused.value.reason


def test_a_deflated_member_counts_inflated_and_is_refused_before_it_is_inflated() -> None:
    ds = _series()[0]
    ds.PixelData = bytes(8 * 2**20)  # 8 MiB of zeros: ~8 KiB deflated
    deflated = _file(ds, DeflatedExplicitVRLittleEndian)
    assert len(deflated) < 64 * 2**10
    inflated = member_size(deflated, 2**40)
    assert inflated > 8 * 2**20
    assert member_size(deflated, 2**20) <= 2**20 + 2**20 + len(deflated)  # stops just past the bound
    read_member(deflated, ByteBudget(inflated))
    with pytest.raises(SeriesTooLargeError, match="a deflated instance counted inflated"):
        read_member(deflated, ByteBudget(inflated - 1))


def test_a_member_does_not_keep_the_bytes_it_was_read_from() -> None:
    """pydicom kept them as ``buffer``: each member was held, and pickled to the worker, twice."""
    import pickle

    plain = _file(_series(shape=(64, 64, 3))[0])
    dataset = read_member(plain, ByteBudget(2**30))
    assert dataset.buffer is None
    assert len(pickle.dumps(dataset)) < 1.5 * len(plain)


def test_member_size_of_something_not_dicom_is_its_length() -> None:
    assert member_size(b"not dicom", 10) == 9
