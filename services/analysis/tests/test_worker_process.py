"""The analyser runs in a worker process, not in a thread of the service: ANTs holds the GIL for
seconds at a time (measured on the MNI series: the event loop stalled up to 4 s in a thread, 11 s
under load, against a Kafka session timeout of 10 s), which cost the consumer its group membership
and /healthz its answers. A worker that dies (killed for memory) is replaced for the next series.

The analysers here are builtins (``eval``, ``os._exit``): a function of this test module could not
be unpickled by the spawned worker, which does not import the tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait
from types import SimpleNamespace
from typing import Any

import pytest
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.handlers import AnalysisService
from enclave_analysis.main import analysis_worker
from prometheus_client import CollectorRegistry

WORKER_PID = "__import__('os').getpid()"


@pytest.fixture
def make_service() -> Iterator[Callable[[Callable[..., Any]], AnalysisService]]:
    made: list[AnalysisService] = []

    def make(analyser: Callable[..., Any]) -> AnalysisService:
        service = AnalysisService(
            SimpleNamespace(registry=CollectorRegistry()),  # type: ignore[arg-type]
            AnalysisSettings(),
            assembly=None,  # type: ignore[arg-type]
            store=None,  # type: ignore[arg-type]
            analyser=analyser,
            executor_factory=analysis_worker,
        )
        made.append(service)
        return service

    yield make
    for service in made:
        service.shutdown()


async def test_the_analyser_runs_in_another_process(make_service) -> None:
    service = make_service(eval)
    assert await service._run_analyser(WORKER_PID) not in (None, os.getpid())  # type: ignore[arg-type]


async def test_a_worker_that_dies_fails_its_analysis_and_is_replaced(make_service) -> None:
    service = make_service(os._exit)  # an analysis that kills its process, as the OOM killer would
    with pytest.raises(BrokenProcessPool):
        await service._run_analyser(9)  # type: ignore[arg-type]
    service.analyser = eval  # the next series
    assert await service._run_analyser(WORKER_PID) not in (None, os.getpid())  # type: ignore[arg-type]


async def test_a_stopped_analysis_kills_its_worker_at_once_and_a_new_one_takes_the_next(
    make_service, tmp_path
) -> None:
    """The service stops mid-analysis (its assembler is cancelled): the worker running ANTs is
    killed rather than left to finish an analysis nobody waits for (and the service's exit with it)."""
    started = tmp_path / "started"
    service = make_service(eval)
    running = asyncio.create_task(
        service._run_analyser(  # type: ignore[arg-type]
            f"__import__('pathlib').Path({str(started)!r}).touch() or __import__('time').sleep(120)"
        )
    )
    for _ in range(300):
        if started.exists():
            break
        await asyncio.sleep(0.1)
    assert started.exists()
    [worker] = service._executor._processes.values()  # type: ignore[union-attr]
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert await asyncio.to_thread(wait, [worker.sentinel], 5.0) == [worker.sentinel]
    assert await service._run_analyser(WORKER_PID) not in (None, os.getpid(), worker.pid)  # type: ignore[arg-type]
