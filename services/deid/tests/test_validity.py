"""Output is valid DICOM: re-reads in pydicom and dcmdump, pixel data byte-identical and never decoded."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from io import BytesIO
from pathlib import Path

import pytest
from deid_corpus import corpus_files, storable_instance
from deid_keys import ALL_OPTIONS
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import read_instance, write_instance
from pydicom import dcmread

FILES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "JPEG2000.dcm",
    "emri_small_big_endian.dcm",
    "chrJapMulti.dcm",
    "rtplan.dcm",
)


def _deidentified(name: str, keys) -> tuple[bytes, bytes]:
    data = storable_instance(next(p for p in corpus_files() if p.name == name))
    assert data is not None
    return data, write_instance(deidentify(read_instance(data), ALL_OPTIONS, keys, DeidContext("t")).dataset)


@pytest.mark.parametrize("name", FILES)
def test_rereads_in_pydicom_with_identical_pixels(name: str, keys, monkeypatch) -> None:
    import pydicom.dataset

    def no_decode(*args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decode))
    data, output = _deidentified(name, keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original, out = dcmread(BytesIO(data)), dcmread(BytesIO(output))
    for elem in out.iterall():
        _ = elem.value  # every element decodes
    assert out.get("PixelData") == original.get("PixelData")
    assert out.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID


@pytest.mark.parametrize("name", FILES)
def test_dcmdump_reads_output_without_error(name: str, keys, tmp_path: Path) -> None:
    dcmdump = shutil.which("dcmdump")
    assert dcmdump, "dcmtk's dcmdump is required (apt-get install dcmtk)"
    _, output = _deidentified(name, keys)
    path = tmp_path / "out.dcm"
    path.write_bytes(output)
    run = subprocess.run(
        [dcmdump, "--read-file-only", str(path)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert "E:" not in run.stderr
    assert "W:" not in run.stderr, run.stderr
    assert "PatientIdentityRemoved" in run.stdout
