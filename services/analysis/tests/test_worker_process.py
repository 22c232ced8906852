"""The analyser runs in a worker process, not in a thread of the service: ANTs holds the GIL for
seconds at a time (measured on the MNI series: the event loop stalled up to 4 s in a thread, 11 s
under load, against a Kafka session timeout of 10 s), which cost the consumer its group membership
and /healthz its answers. A worker that dies (killed for memory) is replaced for the next series."""

from __future__ import annotations

import os
from concurrent.futures.process import BrokenProcessPool
from types import SimpleNamespace
from typing import Any

import pytest
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.handlers import AnalysisService
from enclave_analysis.main import analysis_worker
from prometheus_client import CollectorRegistry


def report_pid(datasets: list[Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, str], list[Any]]:
    if datasets == ["die"]:
        os._exit(9)  # as if killed for memory
    return {"pid": os.getpid()}, {}, {}, []


@pytest.fixture
def service():
    runtime = SimpleNamespace(registry=CollectorRegistry())
    analysis = AnalysisService(
        runtime,  # type: ignore[arg-type]
        AnalysisSettings(),
        assembly=None,  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        analyser=report_pid,
        executor_factory=analysis_worker,
    )
    yield analysis
    analysis.shutdown()


async def test_the_analyser_runs_in_another_process(service) -> None:
    measures, *_ = await service._run_analyser([])
    assert measures["pid"] != os.getpid()


async def test_a_worker_that_dies_fails_its_analysis_and_is_replaced(service) -> None:
    first, *_ = await service._run_analyser([])
    with pytest.raises(BrokenProcessPool):
        await service._run_analyser(["die"])
    again, *_ = await service._run_analyser([])
    assert again["pid"] not in (first["pid"], os.getpid())
