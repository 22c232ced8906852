"""Bytes <-> pydicom dataset for the de-identifier: parse without decoding pixels, write Part 10 files."""

from __future__ import annotations

from io import BytesIO
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite


def read_instance(data: bytes | BinaryIO) -> Dataset:
    """Parse a DICOM Part 10 file (bytes or a binary file); pixel data stays as the encoded bytes read."""
    return dcmread(BytesIO(data) if isinstance(data, bytes | bytearray) else data)


def write_instance_to(dataset: Dataset, out: BinaryIO) -> None:
    """Write ``dataset`` as a conformant Part 10 file into ``out`` (no intermediate copy)."""
    dcmwrite(out, dataset, enforce_file_format=True)


def write_instance(dataset: Dataset) -> bytes:
    """Encode ``dataset`` as a conformant Part 10 file (preamble, file meta) in its own transfer syntax."""
    buffer = BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()
