"""Found by a security hunt (F1): deid's memory is about 1 KiB per data element or sequence item, not
3x the instance size. A deflated MR of 89 KiB whose private sequence after Pixel Data held 1.5M empty
items took 2 GiB to parse; 2.4M would have killed the pod, and the redelivered event again (a poison
message). The elements and items are now counted before the parse, and past
``ENCLAVE_DEID_MAX_ELEMENTS_PER_INSTANCE`` the instance is quarantined (``instance_too_complex``)."""

from __future__ import annotations

import glob
import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import pydicom
import pytest
from enclave_common.crypto import LocalKeyring, ObjectIdentity, encrypt_bytes
from enclave_deid.complexity import InflatesTooLarge, TooManyElements, count_elements
from enclave_deid.config import DeidSettings
from enclave_deid.pipeline import (
    WITHHELD,
    DeidPipeline,
    InstanceTooComplex,
    InstanceTooLarge,
    Quarantined,
    _Written,
)
from enclave_deid.policy import DeidPolicy
from enclave_deid.pseudonym_keys import DeidPseudonymKeys
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

PATIENT_NAME = "QUIXOTE^ALONSO"
PATIENT_ID = "PHI-MRN-4711-UNIT"
ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _pipeline(tmp_path: Path, limit: int = 10 * 1024 * 1024, max_elements: int = 400_000) -> DeidPipeline:
    return DeidPipeline(
        store=None,  # type: ignore[arg-type]  # the transform does not touch the store
        study_keys=None,  # type: ignore[arg-type]
        deid_kek=LocalKeyring.generate("deid"),
        keys=DeidPseudonymKeys.from_base64("a" * 44, "x"),
        bucket="enclave-deidentified",
        max_instance_bytes=limit,
        max_elements=max_elements,
        work_dir=tmp_path,
    )


def _transform(pipeline: DeidPipeline, plaintext: bytes) -> _Written | Quarantined:
    originals = LocalKeyring.generate("ingest")
    source = ObjectIdentity("t", "study-key", "originals/1")
    dek, wrapped = originals.generate_data_key(source.key_context())
    blob = encrypt_bytes(plaintext, dek, wrapped, source, segment_size=4096)
    target = ObjectIdentity("t", "study-key", "deidentified/1")
    return pipeline._transform(io.BytesIO(blob), source, originals, "t", DeidPolicy(), target)


def _mr() -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _private_items(group: int, items: int, elements: int = 0) -> bytes:
    """A private creator, ``elements`` empty private LO elements, then a private SQ of undefined
    length holding ``items`` empty items (the hunt's p06 and p22 in small)."""
    out = struct.pack("<HH2sH", group, 0x0010, b"LO", 4) + b"HUNT"
    for element in range(elements):
        out += struct.pack("<HH2sH", group, 0x1000 + element, b"LO", 0)
    out += struct.pack("<HH2s2xI", group, 0x10F0, b"SQ", 0xFFFFFFFF) + ITEM * items + SEQUENCE_END
    return out


def _dataset_bytes(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _part10(ds: Dataset, body: bytes, syntax: str) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    return bytes(128) + b"DICM" + meta.getvalue() + body


def instance(items: int, elements: int = 0, *, deflated: bool = False) -> bytes:
    """MR_small with the private items before Pixel Data (explicit VR LE), or after it, deflated."""
    ds = _mr()
    pixels = ds.PixelData
    for tag in [element.tag for element in ds if element.tag.group >= 0x0029]:
        del ds[tag]
    pixel_element = struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", len(pixels)) + pixels
    if not deflated:
        body = _dataset_bytes(ds) + _private_items(0x0029, items, elements) + pixel_element
        return _part10(ds, body, ExplicitVRLittleEndian)
    body = _dataset_bytes(ds) + pixel_element + _private_items(0x7FE1, items, elements)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return _part10(ds, compressor.compress(body) + compressor.flush(), DeflatedExplicitVRLittleEndian)


def pydicom_count(data: bytes) -> int:
    """What pydicom builds: each element (file meta included) and each item, every value converted."""

    def count(ds: Dataset) -> int:
        total = 0
        for element in ds:
            total += 1
            if element.VR == "SQ":
                total += sum(1 + count(item) for item in element.value)
        return total

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        return count(ds) + count(getattr(ds, "file_meta", None) or Dataset())


@pytest.mark.parametrize("deflated", [False, True], ids=["explicit-vr", "deflated-after-pixel-data"])
def test_the_count_is_what_pydicom_builds(deflated: bool) -> None:
    data = instance(items=300, elements=40, deflated=deflated)
    assert count_elements(data, 10**6, 10**8) == pydicom_count(data)
    assert (
        count_elements(data, 10**6, 10**8)
        == count_elements(instance(0, deflated=deflated), 10**6, 10**8) + 340
    )


def test_the_count_never_falls_short_of_pydicom_on_its_test_files() -> None:
    """Over pydicom's own test files (implicit and big-endian, nested and private sequences, UN,
    truncated and deflated files): the walk reads the bytes as pydicom does, or counts more."""
    checked = 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(get_testdata_file("MR_small.dcm")), "*.dcm"))):
        data = Path(path).read_bytes()
        try:
            expected = pydicom_count(data)
        except Exception:  # noqa: S112 - a file pydicom cannot read is refused by the parse anyway
            continue
        assert count_elements(data, 10**9, 2**31) >= expected, Path(path).name
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("deflated", [False, True], ids=["explicit-vr", "deflated-after-pixel-data"])
def test_an_instance_at_the_element_limit_is_deidentified_and_one_past_it_quarantined(
    tmp_path: Path, deflated: bool
) -> None:
    data = instance(items=500, elements=20, deflated=deflated)
    count = pydicom_count(data)
    written = _transform(_pipeline(tmp_path, max_elements=count), data)
    assert isinstance(written, _Written)
    written.ciphertext.close()

    with pytest.raises(InstanceTooComplex) as caught:
        _transform(_pipeline(tmp_path, max_elements=count - 1), data)
    error = caught.value
    assert isinstance(error, WITHHELD)  # quarantined with its code and reason, not dead-lettered
    assert error.code == "instance_too_complex"
    assert error.reason == (
        f"instance has more than {count - 1} data elements and sequence items; de-identification holds "
        f"each in memory (about 1 KiB apiece) and accepts at most {count - 1} "
        "(ENCLAVE_DEID_MAX_ELEMENTS_PER_INSTANCE)"
    )
    assert PATIENT_ID not in str(error) and "QUIXOTE" not in str(error) and error.__cause__ is None
    assert list(tmp_path.iterdir()) == []


def test_the_count_stops_at_the_limit() -> None:
    """The hunt's instance in small: far past the limit, the walk stops there (memory and time)."""
    data = instance(items=200_000, deflated=True)
    assert len(data) < 64 * 1024
    with pytest.raises(TooManyElements):
        count_elements(data, 1000, 10**8)


def test_a_deflated_dataset_that_inflates_past_the_size_limit_is_too_large(tmp_path: Path) -> None:
    """pydicom inflates a deflated dataset whole and unbounded: the count inflates it first, at most
    to the instance-size limit."""
    data = instance(items=100_000, deflated=True)  # about 0.8 MB inflated, a few KiB on the wire
    assert len(data) < 64 * 1024
    with pytest.raises(InflatesTooLarge):
        count_elements(data, 10**9, 256 * 1024)
    pipeline = _pipeline(tmp_path, limit=256 * 1024)
    with pytest.raises(InstanceTooLarge, match=r"inflates to more than 262144 bytes.*MAX_INSTANCE_BYTES"):
        _transform(pipeline, data)


def test_the_limit_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DeidSettings().max_elements_per_instance == 400_000
    monkeypatch.setenv("ENCLAVE_DEID_MAX_ELEMENTS_PER_INSTANCE", "1000000")
    assert DeidSettings().max_elements_per_instance == 1_000_000
