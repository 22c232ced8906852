"""Bytes <-> pydicom dataset for the de-identifier: parse without decoding pixels, write Part 10 files."""

from __future__ import annotations

import struct
from io import BytesIO
from typing import BinaryIO

from pydicom import dcmread
from pydicom.charset import default_encoding
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomIO
from pydicom.filewriter import dcmwrite, write_data_element, write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32


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
    _follow_the_bytes(dataset, meta)
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in dataset:
        meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in dataset:
        meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta = meta
    return dataset


#: The transfer syntaxes without compression, by the (implicit VR, little endian) encoding they name.
_NATIVE_SYNTAXES = {
    (True, True): ImplicitVRLittleEndian,
    (False, True): ExplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


def _follow_the_bytes(dataset: Dataset, meta: FileMetaDataset) -> None:
    """Make the file meta and ``dataset.original_encoding`` say how the dataset was actually read.

    pydicom reads a dataset whose first element contradicts the meta's transfer syntax as the bytes
    are (with a warning), but still records the meta's encoding as the dataset's: the writer then
    wrote implicit-VR elements, which have no VR, as explicit VR, and failed. A native syntax is
    replaced by the one the bytes use, so the copy is written as it was read. An encapsulated syntax
    (JPEG and the like are explicit VR) is kept, and the writer converts the dataset to it. Deflated
    and private syntaxes are left as they are.
    """
    syntax: UID | None = meta.get("TransferSyntaxUID")
    if (
        syntax is None
        or syntax == DeflatedExplicitVRLittleEndian
        or syntax.is_private
        or not syntax.is_transfer_syntax
    ):
        return
    read_as = _read_encoding(dataset)
    if read_as is None or read_as == (syntax.is_implicit_VR, syntax.is_little_endian):
        return
    dataset.set_original_encoding(read_as[0], read_as[1], dataset.original_character_set)
    if syntax in _NATIVE_SYNTAXES.values() and read_as in _NATIVE_SYNTAXES:
        meta.TransferSyntaxUID = _NATIVE_SYNTAXES[read_as]


def _read_encoding(dataset: Dataset) -> tuple[bool, bool] | None:
    """(implicit VR, little endian) the reader used for the dataset's elements, from its first raw
    element (the command group, read as implicit VR whatever the file says, does not count)."""
    for tag, elem in dataset.items():  # in file order, not converted
        if isinstance(elem, RawDataElement) and tag >> 16:
            return bool(elem.is_implicit_VR), bool(elem.is_little_endian)
    return None


def write_instance_to(dataset: Dataset, out: BinaryIO, source: bytes | None = None) -> None:
    """Write ``dataset`` as a Part 10 file into ``out``: preamble, ``DICM``, file meta, then the dataset.

    The preamble is the dataset's own, or 128 zero bytes. The file meta must be complete: the
    de-identifier rebuilds it. pydicom's ``write_file_meta_info`` still checks it against the
    standard. This is pydicom's ``dcmwrite(..., enforce_file_format=True)`` without its defensive
    deep copy of the file meta, which was about a quarter of the write time for a small MR. Deflated
    and private transfer syntaxes go through ``dcmwrite`` itself.

    ``source``: the bytes ``dataset`` was read from. Top-level elements still exactly as read are
    then copied from it in runs instead of one by one (see ``_write_dataset_spliced``).
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
    if (
        source is None
        or not syntax.is_little_endian
        or dataset.original_encoding != (syntax.is_implicit_VR, True)
    ):
        write_dataset(fp, dataset)
    else:
        _write_dataset_spliced(fp, dataset, memoryview(source))


def write_instance(dataset: Dataset, source: bytes | None = None) -> bytes:
    """Encode ``dataset`` as a Part 10 file (see ``write_instance_to``) in its own transfer syntax."""
    buffer = BytesIO()
    write_instance_to(dataset, buffer, source)
    return buffer.getvalue()


def _write_dataset_spliced(fp: DicomIO, dataset: Dataset, source: memoryview) -> None:
    """pydicom's ``write_dataset`` for a little-endian dataset in its original encoding, except that
    runs of top-level elements found byte for byte in ``source`` are copied from it in one write.

    An element is copied only when the bytes at its recorded position are exactly what
    ``write_data_element`` would write for it: its tag, VR and length header and then its value.
    Other raw elements with a defined length (the pre-encoded replacements of the de-identification)
    are written as that same header and value. Everything else goes through ``write_data_element``:
    decoded elements, sequences, undefined lengths. So the output is byte for byte the same as
    ``write_dataset``'s (tested over the corpus). Written by hand because pydicom has no writer that
    copies unchanged elements; the de-identified copy of a small MR is mostly raw elements, and
    pydicom spends several microseconds on each.
    """
    implicit = bool(fp.is_implicit_VR)
    encoding = dataset.get("SpecificCharacterSet", default_encoding)
    run_start = run_end = -1  # the pending run of source bytes (none while equal)

    def flush() -> None:
        if run_end > run_start:
            fp.write(source[run_start:run_end])

    for tag in sorted(dataset.keys()):
        if tag.element == 0 and tag.group > 6:
            continue  # retired group lengths are not written (as in write_dataset)
        elem = dataset.get_item(tag)
        header = _raw_header(elem, implicit) if isinstance(elem, RawDataElement) else None
        if header is not None:
            start = elem.value_tell - len(header)
            if _found_at(source, start, header, elem.value):
                if start != run_end:
                    flush()
                    run_start = start
                run_end = elem.value_tell + elem.length
                continue
        flush()
        run_start = run_end = -1
        if header is not None:
            fp.write(header)
            fp.write(elem.value)
        else:
            write_data_element(fp, elem, encoding)
    flush()


def _found_at(source: memoryview, start: int, header: bytes, value: bytes) -> bool:
    """Whether ``source`` holds ``header`` then ``value`` at ``start``."""
    value_at = start + len(header)
    return (
        start >= 0
        and value_at + len(value) <= len(source)
        and source[start:value_at] == header
        and source[value_at : value_at + len(value)] == value
    )


def _raw_header(elem: RawDataElement, implicit: bool) -> bytes | None:
    """The tag, VR and length ``write_data_element`` writes before a raw element's value, or None
    where it does more than that (undefined length, a value too long for a 16-bit length field)."""
    value = elem.value
    if not isinstance(value, bytes) or elem.length != len(value) or elem.length == 0xFFFFFFFF:
        return None
    tag = struct.pack("<HH", elem.tag >> 16, elem.tag & 0xFFFF)
    if implicit:
        return tag + struct.pack("<I", elem.length)
    if elem.VR is None:
        return None
    if elem.VR in EXPLICIT_VR_LENGTH_32:
        return tag + elem.VR.encode("ascii") + struct.pack("<HI", 0, elem.length)
    if elem.length <= 0xFFFF:
        return tag + elem.VR.encode("ascii") + struct.pack("<H", elem.length)
    return None
