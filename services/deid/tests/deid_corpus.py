"""The PHI-bearing test files shipped with pydicom and pydicom-data (no network)."""

from __future__ import annotations

import importlib.metadata
import warnings
from io import BytesIO
from pathlib import Path

import pydicom.data
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import generate_uid

PYDICOM_DATA = Path(pydicom.data.__file__).parent
SKIPPED_SUFFIXES = (".py", ".json", ".txt", ".gz", ".bz2", ".zip", ".pyc", ".xml", ".raw")


def corpus_files() -> list[Path]:
    """Every file of pydicom's test and charset data and of pydicom-data."""
    files = [p for p in (PYDICOM_DATA / "test_files").rglob("*") if p.is_file()]
    files += [p for p in (PYDICOM_DATA / "charset_files").glob("*") if p.is_file()]
    for entry in importlib.metadata.files("pydicom-data") or []:
        if str(entry).startswith("data_store/data/"):
            files.append(Path(str(entry.locate())))
    return sorted(p for p in files if not p.name.endswith(SKIPPED_SUFFIXES))


def storable_instance(path: Path) -> bytes | None:
    """The file as Part 10 bytes that pydicom can read and write back, with a SOP Instance UID
    (synthesised for the few test files without one); None for files pydicom itself cannot round-trip."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            dataset = dcmread(path)
            if "PatientName" not in dataset and "PatientID" not in dataset and not _has_private(dataset):
                return None
            if "SOPInstanceUID" not in dataset:
                dataset.SOPInstanceUID = generate_uid()
            if "SOPClassUID" not in dataset:
                dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
            buffer = BytesIO()
            dcmwrite(buffer, dataset, enforce_file_format=True)
            dcmread(BytesIO(buffer.getvalue()))
        except Exception:  # noqa: BLE001 - a file pydicom cannot round-trip is not ours to test
            return None
    return buffer.getvalue()


def _has_private(dataset: Dataset) -> bool:
    return any(elem.tag.is_private for elem in dataset)


def item(**elements: object) -> Dataset:
    """A sequence item with these attributes (keyword=value)."""
    made = Dataset()
    for keyword, value in elements.items():
        setattr(made, keyword, value)
    return made
