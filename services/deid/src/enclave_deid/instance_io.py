"""Bytes <-> pydicom dataset for the de-identifier: parse without decoding pixels, write Part 10 files."""

from __future__ import annotations

from io import BytesIO
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian


def read_instance(data: bytes | BinaryIO) -> Dataset:
    """Parse an instance (bytes or a binary file); pixel data stays as the encoded bytes read.

    Real STOW-RS clients do not all send Part 10 files: the Python dicomweb-client writes the file
    meta group without the 128-byte preamble and ``DICM``, and the gateway also accepts a bare
    dataset. Those are read with pydicom's ``force`` and given the file meta a Part 10 output needs.
    """
    stream = BytesIO(data) if isinstance(data, bytes | bytearray) else data
    start = stream.tell()
    try:
        dataset = dcmread(stream)
    except InvalidDicomError:
        stream.seek(start)
        dataset = dcmread(stream, force=True)
        try:
            identified = "SOPClassUID" in dataset and "SOPInstanceUID" in dataset
        except Exception as exc:  # force=True on garbage: any access may fail
            raise InvalidDicomError("the bytes are not a DICOM dataset") from exc
        if not identified:
            raise InvalidDicomError("the bytes are not a DICOM dataset (no SOP Class/Instance UID)") from None
    meta = getattr(dataset, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, little = dataset.original_encoding
        if not little:
            raise InvalidDicomError("a big-endian dataset without file meta is not supported")
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in dataset:
        meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in dataset:
        meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta = meta
    return dataset


def write_instance_to(dataset: Dataset, out: BinaryIO) -> None:
    """Write ``dataset`` as a conformant Part 10 file into ``out`` (no intermediate copy)."""
    dcmwrite(out, dataset, enforce_file_format=True)


def write_instance(dataset: Dataset) -> bytes:
    """Encode ``dataset`` as a conformant Part 10 file (preamble, file meta) in its own transfer syntax."""
    buffer = BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()
