"""Replays every input the fuzzer (services/gateway/fuzz/fuzz_edge.py) saved as a finding: multipart
bodies (``multipart-*.bin``: the content type, a newline, the body) and instances (``dicom-*.bin``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_edge.py"
REGRESSIONS = Path(__file__).parent / "corpus" / "regressions"
MULTIPART = sorted(REGRESSIONS.glob("multipart-*.bin"))
DICOM = sorted(REGRESSIONS.glob("dicom-*.bin"))
SIZES = pytest.mark.parametrize("sizes", [[1], [7, 3, 64], [1 << 20]], ids=["1-byte", "mixed", "whole"])


def _load_fuzz() -> ModuleType:
    name = "enclave_gateway_fuzz_edge"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, FUZZ)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_regression_folder_has_both_kinds() -> None:
    assert MULTIPART, f"no multipart-*.bin in {REGRESSIONS}"
    assert DICOM, f"no dicom-*.bin in {REGRESSIONS}"


@pytest.mark.parametrize("path", MULTIPART, ids=[case.name for case in MULTIPART])
@SIZES
def test_saved_multipart_finding_holds_the_invariants(path: Path, sizes: list[int]) -> None:
    content_type, _, body = path.read_bytes().partition(b"\n")
    _load_fuzz().check_multipart(content_type.decode("latin-1"), body, sizes)


@pytest.mark.parametrize("path", DICOM, ids=[case.name for case in DICOM])
@SIZES
def test_saved_validation_finding_holds_the_invariants(path: Path, sizes: list[int]) -> None:
    _load_fuzz().check_validation(path.read_bytes(), sizes)
