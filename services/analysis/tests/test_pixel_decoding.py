"""Pixel data analysis cannot decode is a clear ``analysis.failed`` reason, not an unexpected error;
and every transfer syntax the gateway accepts by default can be decoded here. JPEG Lossless (Process
14, the usual lossless syntax of MR archives) and HTJ2K had no decoder until the ninth session: such
a series was accepted, stored and de-identified, and its analysis then failed with pydicom's
RuntimeError on every attempt."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from enclave_analysis.errors import PixelDataError
from enclave_analysis.volume import build_volume, decodable_transfer_syntaxes
from enclave_gateway.validation import DEFAULT_TRANSFER_SYNTAXES
from pydicom.data import get_testdata_file
from pydicom.uid import UID, generate_uid


def test_every_transfer_syntax_the_gateway_accepts_by_default_is_decodable() -> None:
    assert {UID(uid).name for uid in DEFAULT_TRANSFER_SYNTAXES} <= set(decodable_transfer_syntaxes())


def _jpeg_lossless_series(slices: int = 3) -> list[pydicom.Dataset]:
    """pydicom's JPEG Lossless SV1 test image as a stack of slices with plane geometry."""
    series = generate_uid()
    out = []
    for k in range(slices):
        ds = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series, generate_uid()
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 2.0 * k]
        ds.PixelSpacing = [0.25, 0.25]  # a 1024x256 image: a field of view within 500 mm
        out.append(ds)
    return out


def test_a_jpeg_lossless_series_is_decoded_into_a_volume() -> None:
    series = _jpeg_lossless_series()
    assert series[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    volume = build_volume(series)
    assert volume.shape == (series[0].Columns, series[0].Rows, 3)
    expected = series[0].pixel_array.T * float(series[0].get("RescaleSlope", 1) or 1)
    assert np.allclose(volume.voxels[:, :, 0], expected + float(series[0].get("RescaleIntercept", 0) or 0))


def test_pixel_data_that_does_not_decode_is_a_clear_failure() -> None:
    series = _jpeg_lossless_series()
    series[1].PixelData = series[1].PixelData[:200]  # truncated: no longer a valid JPEG stream
    with pytest.raises(PixelDataError) as failed:
        build_volume(series)
    assert failed.value.code == "pixel_data_unreadable"
    assert failed.value.reason.startswith("the pixel data of instance ")
    assert "cannot be decoded: it is not valid JPEG Lossless" in failed.value.reason
    assert "decodable here: " in failed.value.reason and "RLE Lossless" in failed.value.reason


def test_a_transfer_syntax_without_any_decoder_is_named() -> None:
    series = _jpeg_lossless_series()
    raw = io.BytesIO()
    series[0].save_as(raw, enforce_file_format=True)
    series[0] = pydicom.dcmread(io.BytesIO(raw.getvalue()))
    series[0].file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: pydicom decodes no video
    with pytest.raises(PixelDataError, match="no decoder for MPEG2 Main Profile / Main Level is installed"):
        build_volume(series)
