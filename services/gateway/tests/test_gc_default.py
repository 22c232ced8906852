"""The gateway collects generation 0 every 50,000 allocations by default (docs/gateway.md, Benchmark);
the setting can be put back to Python's 700 and refuses nonsense."""

from __future__ import annotations

import pytest
from enclave_gateway.config import GatewaySettings
from pydantic import ValidationError


def test_gateway_gc_threshold_default_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings().gc_threshold0 == 50_000
    monkeypatch.setenv("ENCLAVE_GATEWAY_GC_THRESHOLD0", "700")
    assert GatewaySettings().gc_threshold0 == 700
    monkeypatch.setenv("ENCLAVE_GATEWAY_GC_THRESHOLD0", "5")
    with pytest.raises(ValidationError):
        GatewaySettings()
