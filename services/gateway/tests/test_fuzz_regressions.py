"""Replays every input the fuzzer (services/gateway/fuzz/fuzz_edge.py) saved as a finding: multipart
bodies (``multipart-*.bin``: the content type, a newline, the body) and instances (``dicom-*.bin``)."""

from __future__ import annotations

from pathlib import Path

import fuzz_edge  # tests/conftest.py puts ../fuzz on sys.path
import pytest

REGRESSIONS = Path(__file__).parent / "corpus" / "regressions"
MULTIPART = sorted(REGRESSIONS.glob("multipart-*.bin"))
DICOM = sorted(REGRESSIONS.glob("dicom-*.bin"))
SIZES = pytest.mark.parametrize("sizes", [[1], [7, 3, 64], [1 << 20]], ids=["1-byte", "mixed", "whole"])


def test_regression_folder_has_both_kinds() -> None:
    assert MULTIPART, f"no multipart-*.bin in {REGRESSIONS}"
    assert DICOM, f"no dicom-*.bin in {REGRESSIONS}"


@pytest.mark.parametrize("path", MULTIPART, ids=[case.name for case in MULTIPART])
@SIZES
def test_saved_multipart_finding_holds_the_invariants(path: Path, sizes: list[int]) -> None:
    content_type, _, body = path.read_bytes().partition(b"\n")
    fuzz_edge.check_multipart(content_type.decode("latin-1"), body, sizes)


@pytest.mark.parametrize("path", DICOM, ids=[case.name for case in DICOM])
@SIZES
def test_saved_validation_finding_holds_the_invariants(path: Path, sizes: list[int]) -> None:
    fuzz_edge.check_validation(path.read_bytes(), sizes)
