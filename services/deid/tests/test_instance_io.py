"""The de-identifier reads what real STOW-RS clients send, not only Part 10 files."""

from __future__ import annotations

import io

import pydicom
import pytest
from enclave_deid.instance_io import read_instance, write_instance
from pydicom.data import get_testdata_file


def _source() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("MR_small.dcm"))


def test_part10_file_is_read():
    out = io.BytesIO()
    _source().save_as(out, enforce_file_format=True)
    assert read_instance(out.getvalue()).Rows == 64


def test_file_meta_without_preamble_as_the_python_dicomweb_client_sends_it():
    ds = _source()
    ds.preamble = None
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds)  # what dicomweb-client's store_instances does for a dataset built in memory
    raw = out.getvalue()
    assert raw[128:132] != b"DICM"
    parsed = read_instance(raw)
    assert parsed.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert write_instance(parsed)[128:132] == b"DICM"


@pytest.mark.parametrize("implicit", [True, False])
def test_bare_dataset_gets_the_file_meta_a_part10_output_needs(implicit):
    ds = _source()
    del ds.file_meta
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, implicit_vr=implicit, little_endian=True)
    parsed = read_instance(out.getvalue())
    expected = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    assert parsed.file_meta.TransferSyntaxUID == expected
    assert parsed.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert pydicom.dcmread(io.BytesIO(write_instance(parsed))).PixelData == ds.PixelData
