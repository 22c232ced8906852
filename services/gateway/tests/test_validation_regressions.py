"""Replays every input the fuzzer (services/gateway/fuzz/fuzz_edge.py) saved as a validation finding."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_edge.py"
REGRESSIONS = Path(__file__).parent / "corpus" / "regressions"
CASES = sorted(REGRESSIONS.glob("dicom-*.bin"))


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


def test_regression_folder_is_not_empty() -> None:
    assert CASES, f"no dicom-*.bin in {REGRESSIONS}"


@pytest.mark.parametrize("path", CASES, ids=[case.name for case in CASES])
@pytest.mark.parametrize("sizes", [[1], [7, 3, 64], [1 << 20]], ids=["1-byte", "mixed", "whole"])
def test_saved_validation_finding_holds_the_invariants(path: Path, sizes: list[int]) -> None:
    fuzz = _load_fuzz()
    payload = path.read_bytes()
    fuzz.check_validation(payload, sizes)
