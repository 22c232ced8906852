"""A claimed series whose analysis fails with an unexpected error is tried again later, a bounded
number of times, and then reported failed (``analysis_internal_error``) instead of being retried
forever with no answer for the hospital; a dependency outage is retried without counting. (Before,
an unexpected error left the series claimed until its 15-minute lease ran out, then ran it again,
for good.)

A series that stays incomplete (a member with no outcome) is reported failed too, rather than
waited for in silence."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError
from enclave_analysis.assembly import SeriesAssembly
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.handlers import AnalysisService
from enclave_common import topics
from enclave_common.envelope import Envelope
from prometheus_client import CollectorRegistry

MEMBERS = [{"_id": f"iu-{n}", "state": "deidentified", "study_key": "st-1", "object": {}} for n in range(3)]


class FakeAssembly:
    """The calls AnalysisService makes on SeriesAssembly, recorded."""

    def __init__(self) -> None:
        self.retried: list[tuple[float, bool]] = []
        self.finished: list[tuple[str, str | None]] = []
        self.series = SimpleNamespace(update_one=self._ignore)

    missing = staticmethod(SeriesAssembly.missing)

    async def _ignore(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def members_of(self, series_id: str) -> list[dict[str, Any]]:
        return MEMBERS

    async def retry_later(self, series: dict[str, Any], delay_s: float, *, counted: bool) -> None:
        self.retried.append((delay_s, counted))

    async def finish(
        self, series: dict[str, Any], analysis_id: str, outcome: str, reason_code: str | None = None
    ) -> None:
        self.finished.append((outcome, reason_code))


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, Envelope]] = []

    async def publish(self, topic: str, envelope: Envelope, *, key: str) -> None:
        self.published.append((topic, envelope))


def service(load_failure: Exception) -> tuple[AnalysisService, FakeAssembly, FakePublisher]:
    publisher = FakePublisher()
    runtime = SimpleNamespace(publisher=publisher, registry=CollectorRegistry(), count_crypto=lambda _: None)
    assembly = FakeAssembly()
    settings = AnalysisSettings(max_attempts=3, retry_delay_s=42.0)
    analysis = AnalysisService(runtime, settings, assembly, store=None, analyser=None)  # type: ignore[arg-type]

    async def load(tenant: str, member: dict[str, Any]) -> Any:
        raise load_failure

    analysis._load = load  # type: ignore[method-assign]
    return analysis, assembly, publisher


def series(attempts: int) -> dict[str, Any]:
    return {"_id": "t:sk", "tenant": "t", "series_key": "sk", "changed_at": 1, "attempts": attempts}


async def test_an_unexpected_error_is_tried_again_later_and_counted() -> None:
    analysis, assembly, publisher = service(ValueError("a bug, or data the code does not expect"))
    await analysis.attempt(series(attempts=1))
    assert assembly.retried == [(42.0, True)]
    assert publisher.published == [] and assembly.finished == []
    failures = analysis.runtime.registry.get_sample_value(
        "enclave_analysis_attempt_failures_total", {"cause": "unexpected"}
    )
    assert failures == 1


async def test_a_dependency_outage_is_tried_again_without_counting() -> None:
    analysis, assembly, publisher = service(EndpointConnectionError(endpoint_url="http://minio"))
    await analysis.attempt(series(attempts=3))
    assert assembly.retried == [(42.0, False)]
    assert publisher.published == []


@pytest.mark.parametrize("attempts", [4, 9])
async def test_past_the_last_attempt_the_series_is_reported_failed_not_tried_again(attempts: int) -> None:
    analysis, assembly, publisher = service(ValueError("never reached"))
    await analysis.attempt(series(attempts=attempts))
    assert assembly.retried == []
    [(topic, envelope)] = publisher.published
    assert topic == topics.ANALYSIS_FAILED
    assert envelope.data["reason_code"] == "analysis_internal_error"
    assert "failed on each of 3 attempts" in envelope.data["reason"]
    assert sorted(envelope.data["instance_upload_ids"]) == [m["_id"] for m in MEMBERS]
    assert assembly.finished == [("failed", "analysis_internal_error")]


async def test_a_series_still_incomplete_when_overdue_is_reported_with_what_it_awaits_not_analysed() -> None:
    analysis, assembly, publisher = service(AssertionError("an incomplete series must not be loaded"))
    overdue = {
        **series(attempts=1),
        "expected": ["iu-0", "iu-1", "iu-2", "iu-lost-1", "iu-lost-2"],
        "settled": ["iu-0", "iu-1", "iu-2"],
    }
    await analysis.attempt(overdue)
    assert assembly.retried == []
    [(topic, envelope)] = publisher.published
    assert topic == topics.ANALYSIS_FAILED
    assert envelope.data["reason_code"] == "series_incomplete"
    assert envelope.data["reason"].startswith(
        "2 of the 5 instances uploaded for this series have had no outcome"
    )
    assert "for 6 h" in envelope.data["reason"]
    assert envelope.data["awaiting_instance_upload_ids"] == ["iu-lost-1", "iu-lost-2"]
    assert sorted(envelope.data["instance_upload_ids"]) == [m["_id"] for m in MEMBERS]
    assert assembly.finished == [("failed", "series_incomplete")]
