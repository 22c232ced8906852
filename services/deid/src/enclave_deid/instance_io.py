"""Bytes <-> pydicom dataset for the de-identifier: parse without decoding pixels, write Part 10 files."""

from __future__ import annotations

from io import BytesIO
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomIO
from pydicom.filewriter import dcmwrite, write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian


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
    """Write ``dataset`` as a Part 10 file into ``out``: preamble, ``DICM``, file meta, then the dataset.

    The preamble is the dataset's own, or 128 zero bytes. The file meta must be complete: the
    de-identifier rebuilds it. pydicom's ``write_file_meta_info`` still checks it against the
    standard. This is pydicom's ``dcmwrite(..., enforce_file_format=True)`` without its defensive
    deep copy of the file meta, which was about a quarter of the write time for a small MR. Deflated
    and private transfer syntaxes go through ``dcmwrite`` itself.
    """
    meta = dataset.file_meta
    syntax = meta.get("TransferSyntaxUID")
    if (
        syntax is None
        or syntax == DeflatedExplicitVRLittleEndian
        or syntax.is_private
        or not syntax.is_transfer_syntax
    ):
        dcmwrite(out, dataset, enforce_file_format=True)
        return
    preamble = getattr(dataset, "preamble", None) or bytes(128)
    if len(preamble) != 128:
        raise ValueError("a DICOM preamble is 128 bytes")
    fp = DicomIO(out)
    fp.is_implicit_VR, fp.is_little_endian = syntax.is_implicit_VR, syntax.is_little_endian
    fp.write(preamble)
    fp.write(b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    write_dataset(fp, dataset)


def write_instance(dataset: Dataset) -> bytes:
    """Encode ``dataset`` as a Part 10 file (see ``write_instance_to``) in its own transfer syntax."""
    buffer = BytesIO()
    write_instance_to(dataset, buffer)
    return buffer.getvalue()
