"""Leak scanner over every PHI-bearing file shipped with pydicom and pydicom-data: zero hits allowed."""

from __future__ import annotations

import warnings
from io import BytesIO

import pytest
from deid_corpus import corpus_files, storable_instance
from deid_keys import ALL_OPTIONS
from deid_leakscan import find_leaks
from enclave_deid.deidentify import DeidContext, deidentify
from enclave_deid.instance_io import read_instance, write_instance
from enclave_deid.policy import DeidPolicy
from pydicom import dcmread

POLICIES = {"basic": DeidPolicy(), "all-options": ALL_OPTIONS}
KEY_FILES = (
    "CT_small.dcm",  # GE private headers, names, ids, dates, institution
    "MR_small.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",  # Siemens CSA headers (pydicom-data)
    "nested_priv_SQ.dcm",  # private sequences nested in private sequences
    "chrJapMulti.dcm",  # ISO 2022 IR 87 person names
    "chrRuss.dcm",
    "chrArab.dcm",
    "chrX2.dcm",  # UTF-8
    "rtplan.dcm",  # names and UIDs inside sequences
)


def _scan(data: bytes, policy: DeidPolicy, keys) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = dcmread(BytesIO(data))
        output = write_instance(
            deidentify(read_instance(data), policy, keys, DeidContext("tenant-a")).dataset, data
        )  # with the source, as the service writes small instances
    return find_leaks(original, output, policy)


@pytest.mark.parametrize("policy_name", POLICIES)
@pytest.mark.parametrize("name", KEY_FILES)
def test_key_files_leak_nothing(name: str, policy_name: str, keys) -> None:
    path = next(p for p in corpus_files() if p.name == name)
    data = storable_instance(path)
    assert data is not None, f"{name} should be a readable test file"
    assert _scan(data, POLICIES[policy_name], keys) == []


def test_preamble_is_not_carried_over(keys) -> None:
    """The 128-byte preamble is application-defined (a TIFF header in a dual-format file) and could
    hold anything: the output's is zeros, whatever the input's held."""
    ds = dcmread(next(p for p in corpus_files() if p.name == "MR_small.dcm"))
    planted = b"II*\x00 Patient: QUIXOTE^ALONSO MRN PHI-4711 "
    ds.preamble = planted.ljust(128, b"\x00")
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert buffer.getvalue().startswith(planted)
    output = write_instance(
        deidentify(read_instance(buffer.getvalue()), DeidPolicy(), keys, DeidContext("tenant-a")).dataset
    )
    assert output[:132] == bytes(128) + b"DICM"
    assert b"QUIXOTE" not in output and b"PHI-4711" not in output


def test_scanner_finds_a_planted_leak(keys) -> None:
    """The scanner is not blind: an output still holding the patient's name is reported."""
    path = next(p for p in corpus_files() if p.name == "CT_small.dcm")
    data = storable_instance(path)
    assert data is not None
    original = dcmread(BytesIO(data))
    assert "PatientName" in find_leaks(original, data, DeidPolicy())


@pytest.mark.slow
@pytest.mark.parametrize("policy_name", POLICIES)
def test_whole_corpus_leaks_nothing(policy_name: str, keys) -> None:
    leaks: dict[str, list[str]] = {}
    scanned = 0
    for path in corpus_files():
        data = storable_instance(path)
        if data is None:
            continue
        scanned += 1
        found = _scan(data, POLICIES[policy_name], keys)
        if found:
            leaks[path.name] = found
    assert scanned > 150
    assert leaks == {}


@pytest.mark.slow
def test_spliced_writer_writes_what_pydicom_writes(keys) -> None:
    """Copying unchanged elements from the source gives the very bytes pydicom's write_dataset gives."""
    compared = 0
    for path in corpus_files():
        data = storable_instance(path)
        if data is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dataset = deidentify(read_instance(data), ALL_OPTIONS, keys, DeidContext("tenant-a")).dataset
                expected = write_instance(dataset)
            except Exception:
                continue  # what the pipeline refuses (it never writes those)
            assert write_instance(dataset, data) == expected, path.name
            compared += 1
    assert compared > 150
