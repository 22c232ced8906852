"""An analysis that does not end (a native decoder hung on a pathological codestream) is stopped after
``ENCLAVE_ANALYSIS_MAX_ANALYSIS_S``: its worker process is killed and the series is reported failed
(``analysis_timed_out``), not retried. Until then it held the replica until the 15-minute lease handed
the series to another replica, which hung on it too, and so on.

The analyser is the builtin ``eval`` (a function of this module could not be unpickled by the
spawned worker, which does not import the tests)."""

from __future__ import annotations

import asyncio
import os
import time
from multiprocessing.connection import wait
from types import SimpleNamespace
from typing import Any

import pydantic
import pytest
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.errors import REASON_CODES, AnalysisTimedOut
from enclave_analysis.handlers import AnalysisService
from enclave_analysis.main import analysis_worker
from enclave_common import topics
from enclave_common.envelope import Envelope
from prometheus_client import CollectorRegistry

HANG = "__import__('time').sleep(120)"
WORKER_PID = "__import__('os').getpid()"
MEMBERS = [{"_id": f"iu-{n}", "state": "deidentified", "study_key": "st", "object": {}} for n in range(3)]


class Assembly:
    def __init__(self) -> None:
        self.steps: list[Any] = []

    missing = staticmethod(lambda series: [])

    async def members_of(self, series_id: str) -> list[dict[str, Any]]:
        return MEMBERS

    async def decide(self, series: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
        return outcome

    async def retry_later(self, series: dict[str, Any], delay_s: float, *, counted: bool) -> None:
        self.steps.append(("retry", counted))

    async def finish(
        self, series: dict[str, Any], analysis_id: str, outcome: str, reason: Any = None
    ) -> None:
        self.steps.append(("finish", outcome, reason))


class Publisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, Envelope]] = []

    async def publish(self, topic: str, envelope: Envelope, *, key: str) -> None:
        self.published.append((topic, envelope))


@pytest.fixture
def service() -> Any:
    runtime = SimpleNamespace(
        publisher=Publisher(), registry=CollectorRegistry(), count_crypto=lambda _: None
    )
    made = AnalysisService(
        runtime,  # type: ignore[arg-type]
        AnalysisSettings(max_analysis_s=2.0),
        Assembly(),  # type: ignore[arg-type]
        store=None,  # type: ignore[arg-type]
        analyser=eval,  # type: ignore[arg-type]
        executor_factory=analysis_worker,
    )
    yield made
    made.shutdown()


async def test_an_analysis_past_its_time_is_stopped_its_worker_killed_and_a_new_one_takes_the_next(
    service,
) -> None:
    worker_pid = await service._run_analyser(WORKER_PID)  # the worker is up (spawning it is not timed)
    [worker] = service._executor._processes.values()
    started = time.monotonic()
    with pytest.raises(AnalysisTimedOut) as stopped:
        await service._run_analyser(HANG)
    assert 2.0 <= time.monotonic() - started < 10
    assert (
        "ran longer than 2 s" in stopped.value.reason
        and "ENCLAVE_ANALYSIS_MAX_ANALYSIS_S" in stopped.value.reason
    )
    assert await asyncio.to_thread(wait, [worker.sentinel], 5.0) == [worker.sentinel]
    assert await service._run_analyser(WORKER_PID) not in (None, os.getpid(), worker_pid)


async def test_a_series_whose_analysis_hangs_is_reported_failed_not_tried_again(service) -> None:
    real = service._run_analyser

    async def hanging(datasets: list[Any]) -> Any:
        return await real(HANG)

    async def load(tenant: str, member: dict[str, Any], *_: Any) -> Any:
        return {"SOPInstanceUID": member["_id"]}

    service._run_analyser = hanging
    service._load = load
    await service.attempt({"_id": "t:sk", "tenant": "t", "series_key": "sk", "changed_at": 1, "attempts": 1})
    [(topic, envelope)] = service.runtime.publisher.published
    assert topic == topics.ANALYSIS_FAILED and envelope.data["reason_code"] == "analysis_timed_out"
    assert service.assembly.steps == [("finish", "failed", "analysis_timed_out")]
    assert "analysis_timed_out" in REASON_CODES  # what enclave-analysis-rerun --reason-code accepts


def test_the_time_limit_must_end_an_analysis_before_its_lease_does() -> None:
    with pytest.raises(pydantic.ValidationError, match="must be below ENCLAVE_ANALYSIS_LEASE_S"):
        AnalysisSettings(max_analysis_s=900.0, lease_s=900.0)
    assert AnalysisSettings().max_analysis_s == 600.0


async def test_a_timeout_error_the_analyser_raises_itself_is_not_the_time_limit(service) -> None:
    """Only the limit's own expiry is ``analysis_timed_out``; a TimeoutError from inside the analysis
    is an error of the analysis, and the worker is not killed for it (review, eighteenth session)."""
    worker_pid = await service._run_analyser(WORKER_PID)
    with pytest.raises(TimeoutError) as raised:
        await service._run_analyser("(_ for _ in ()).throw(TimeoutError('inside'))")
    assert not isinstance(raised.value, AnalysisTimedOut)
    assert await service._run_analyser(WORKER_PID) == worker_pid  # the same worker
