"""A claimed series whose analysis fails with an unexpected error is tried again later, a bounded
number of times, and then reported failed (``analysis_internal_error``) instead of being retried
forever with no answer for the hospital; a dependency outage is retried without counting. (Before,
an unexpected error left the series claimed until its 15-minute lease ran out, then ran it again,
for good.)

A series that stays incomplete (a member with no outcome) is reported failed too, rather than
waited for in silence."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from botocore.exceptions import EndpointConnectionError
from enclave_analysis.assembly import SeriesAssembly, analysis_id_for
from enclave_analysis.config import AnalysisSettings
from enclave_analysis.handlers import AnalysisService
from enclave_analysis.phantoms import write_mr_series
from enclave_analysis.series_analysis import run_volumetrics
from enclave_analysis.volume import Volume
from enclave_common import topics
from enclave_common.envelope import Envelope
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

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

    #: What members_of answers after the first call (a member settled meanwhile), if set.
    later_members: list[dict[str, Any]] | None = None
    calls = 0

    async def members_of(self, series_id: str) -> list[dict[str, Any]]:
        self.calls += 1
        return MEMBERS if self.calls == 1 or self.later_members is None else self.later_members

    async def mark_changed(self, series: dict[str, Any]) -> None:
        self.changed = True

    async def retry_later(self, series: dict[str, Any], delay_s: float, *, counted: bool) -> None:
        self.retried.append((delay_s, counted))

    async def finish(
        self, series: dict[str, Any], analysis_id: str, outcome: str, reason_code: str | None = None
    ) -> None:
        self.finished.append((outcome, reason_code))

    #: What ``decide`` answers: the outcome given (``...``), another replica's, or None (changed).
    decision: Any = ...

    async def decide(self, series: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any] | None:
        self.decided = outcome
        return outcome if self.decision is ... else self.decision


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

    async def load(tenant: str, member: dict[str, Any], *_: Any) -> Any:
        raise load_failure

    analysis._load = load  # type: ignore[method-assign]
    return analysis, assembly, publisher


def series(attempts: int) -> dict[str, Any]:
    return {"_id": "t:sk", "tenant": "t", "series_key": "sk", "changed_at": 1, "attempts": attempts}


def test_failures_are_counted_from_0_before_the_first() -> None:
    """A series created at the first failure starts at 1, where increase() sees no rise:
    EnclaveAnalysisFailedUnexpectedly missed the first unexpected failure of each pod."""
    analysis, _, _ = service(ValueError("unused"))
    for cause in ("unexpected", "dependency"):
        counted = analysis.runtime.registry.get_sample_value(
            "enclave_analysis_attempt_failures_total", {"cause": cause}
        )
        assert counted == 0


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


def recorded(outcome: str, reason_code: str | None) -> dict[str, Any]:
    """A claim's outcome as ``SeriesAssembly.decide`` records it."""
    topic = topics.ANALYSIS_COMPLETED if outcome == "completed" else topics.ANALYSIS_FAILED
    analysis_id = analysis_id_for("sk", [m["_id"] for m in MEMBERS])
    envelope = Envelope(
        type=topics.event_type(topic),
        source="analysis",
        tenant="t",
        actor="service:analysis",
        correlation_id="c",
        data={"analysis_id": analysis_id, "reason_code": reason_code},
    )
    return {
        "analysis_id": analysis_id,
        "event_id": envelope.id,
        "topic": topic,
        "outcome": outcome,
        "reason_code": reason_code,
        "envelope": envelope.model_dump_json(),
    }


async def test_a_claim_whose_outcome_was_recorded_publishes_that_event_again_not_a_new_run() -> None:
    """The process died after publishing an outcome and before finishing the series, until the
    attempts ran out. The next claim publishes the recorded event unchanged: before the outbox it
    ran again, past the last attempt, and published ``failed`` under the id of the ``completed``
    already published (consumers skipped it; the gateway's status preferred it)."""
    analysis, assembly, publisher = service(AssertionError("a recorded outcome must not be analysed again"))
    earlier = recorded("completed", None)
    await analysis.attempt({**series(attempts=9), "pending_event": earlier})
    [(topic, envelope)] = publisher.published
    assert topic == topics.ANALYSIS_COMPLETED
    assert envelope == Envelope.model_validate_json(earlier["envelope"])
    assert assembly.finished == [("completed", None)] and assembly.retried == []


async def test_an_outcome_is_recorded_before_it_is_published_and_a_replica_publishes_the_first_recorded() -> (
    None
):
    """Two replicas ran one claim (the first one's lease ran out): the one that records second
    publishes the first one's event, so the claim has one outcome event."""
    analysis, assembly, publisher = service(ValueError("never reached"))
    first = recorded("completed", None)
    assembly.decision = first
    await analysis.attempt(series(attempts=4))  # this replica's own outcome: failed, past the last attempt
    assert assembly.decided["outcome"] == "failed"
    assert Envelope.model_validate_json(assembly.decided["envelope"]).data["reason_code"] == (
        "analysis_internal_error"
    )
    [(topic, envelope)] = publisher.published
    assert (topic, envelope.id) == (topics.ANALYSIS_COMPLETED, first["event_id"])
    assert assembly.finished == [("completed", None)]


async def test_a_series_that_changed_while_it_was_analysed_publishes_no_outcome_of_the_old_run() -> None:
    analysis, assembly, publisher = service(ValueError("never reached"))
    assembly.decision = None
    await analysis.attempt(series(attempts=4))
    assert publisher.published == [] and assembly.finished == [] and assembly.retried == []


async def test_a_member_that_settled_while_analysed_makes_the_series_change_not_publish() -> None:
    """The members collection says a member was de-identified since the run read them, but the
    series document does not say it changed (FerretDB 1.x: decide's write undid the settle's change
    mark). The run marks the series changed and publishes nothing; before, the series was finished
    without that member."""
    analysis, assembly, publisher = service(ValueError("never reached"))
    late = {"_id": "iu-late", "state": "deidentified", "study_key": "st-1", "object": {}}
    assembly.later_members = [*MEMBERS, late]
    await analysis.attempt(series(attempts=4))
    assert getattr(assembly, "changed", False)
    assert publisher.published == [] and assembly.finished == []


async def test_a_repeated_failure_never_takes_an_event_id_an_earlier_version_kept() -> None:
    """A claim recorded by an earlier version kept only the event id, under which that version may
    have published a completed analysis before it died: past the last attempt, the failure gets an
    id of its own."""
    analysis, assembly, publisher = service(ValueError("never reached"))
    analysis_id = analysis_id_for("sk", [m["_id"] for m in MEMBERS])
    legacy = {"analysis_id": analysis_id, "event_id": "01a2033b-be48-704a-8a9d-b1a1f0d0f75b"}
    await analysis.attempt({**series(attempts=4), "pending_event": legacy})
    [(topic, envelope)] = publisher.published
    assert topic == topics.ANALYSIS_FAILED and envelope.id != legacy["event_id"]


def _bad_series(problem: str) -> list[Any]:
    volume = Volume(
        voxels=np.random.default_rng(5).uniform(0, 800, (12, 10, 9)).astype(np.float32),
        affine_ras=np.diag([0.9, 1.1, 2.0, 1.0]),
    )
    datasets = write_mr_series(volume, patient_id="PSEUDO-PATIENT-1")
    for n, ds in enumerate(datasets):
        if problem == "pixel spacing 0":
            ds.PixelSpacing = ["0", "0"]
        elif problem == "rescale slope 1e308":
            ds.RescaleSlope = "1e308"
        elif problem == "rescale slope 0":
            ds.RescaleSlope = "0"
        elif problem == "two patients" and n % 2:
            ds.PatientID = "PSEUDO-PATIENT-2"
    return datasets


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("problem", "reason_code"),
    [
        ("pixel spacing 0", "series_geometry"),
        ("rescale slope 1e308", "pixel_values_invalid"),
        ("rescale slope 0", "pixel_values_invalid"),
        ("two patients", "series_mixed_patients"),
    ],
)
async def test_a_series_no_volume_can_be_made_of_fails_at_once_with_its_reason(problem, reason_code) -> None:
    """Before, the first two failed in ANTs on each of three attempts (``analysis_internal_error``
    after ~3 minutes), and the last two were analysed."""
    analysis, assembly, publisher = service(AssertionError("unused"))
    datasets = _bad_series(problem)
    members = [{"_id": f"iu-{n}", "state": "deidentified", "study_key": "st-1"} for n in range(len(datasets))]

    async def members_of(series_id: str) -> list[dict[str, Any]]:
        return members

    async def load(tenant: str, member: dict[str, Any], *_: Any) -> Any:
        return datasets[int(member["_id"].removeprefix("iu-"))]

    assembly.members_of = members_of  # type: ignore[method-assign]
    analysis._load = load  # type: ignore[method-assign]
    analysis.analyser = run_volumetrics
    await analysis.attempt(series(attempts=1))
    assert assembly.retried == []
    [(topic, envelope)] = publisher.published
    assert (topic, envelope.data["reason_code"]) == (topics.ANALYSIS_FAILED, reason_code)
    assert assembly.finished == [("failed", reason_code)]


async def test_where_itk_raised_is_logged_with_an_unexpected_failure() -> None:
    """``native_stderr`` attaches it in the worker process; the text ITK printed is not logged."""
    failure = RuntimeError("Registration failed with error code 1")
    failure.native_error_at = "itkImageMomentsCalculator.hxx:123"  # type: ignore[attr-defined]
    analysis, _, _ = service(failure)
    with capture_logs() as logs:
        await analysis.attempt(series(attempts=1))
    [entry] = [e for e in logs if e["event"] == "series analysis failed; it will be tried again"]
    assert entry["native_error_at"] == "itkImageMomentsCalculator.hxx:123"


async def test_the_assembler_shows_its_backlog_its_last_look_and_the_outcomes_it_published() -> None:
    """Analysis's Kafka lag stays at zero whatever its assembler does: these metrics are what an
    alert can read (deploy/k8s: EnclaveAnalysisBacklogStuck, EnclaveAnalysisAssemblerNotLooking)."""
    analysis, assembly, publisher = service(ValueError("never reached"))
    registry = analysis.runtime.registry
    assert registry.get_sample_value("enclave_analysis_outcomes_total", {"outcome": "failed"}) == 0
    waiting = [series(attempts=4), {**series(attempts=4), "_id": "t:sk2"}]

    async def ready(quiet_period_s: float, incomplete_after_s: float) -> list[dict[str, Any]]:
        return waiting

    still_waiting: list[float | None] = []

    async def claim(found: dict[str, Any], lease_s: float) -> dict[str, Any] | None:
        analysis.settings = analysis.settings.model_copy(update={"scan_interval_s": 3600.0})
        still_waiting.append(registry.get_sample_value("enclave_analysis_series_ready"))
        return found if found is waiting[0] else None  # the second was taken by another replica

    assembly.ready = ready  # type: ignore[attr-defined]
    assembly.claim = claim  # type: ignore[attr-defined]
    before = time.time()
    assembler = asyncio.create_task(analysis.run_assembler())
    while not publisher.published:
        await asyncio.sleep(0.01)
    while len(still_waiting) < 2:
        await asyncio.sleep(0.01)
    assembler.cancel()
    # Two ready; as each is taken it stops counting as waiting (it is in progress, which the
    # autoscaling adds: counted in both, a replica was asked for a series nobody waited on).
    assert still_waiting == [1, 0]
    looked = registry.get_sample_value("enclave_analysis_assembler_last_look_timestamp_seconds")
    assert looked is not None and looked >= before
    assert registry.get_sample_value("enclave_analysis_outcomes_total", {"outcome": "failed"}) == 1
    assert registry.get_sample_value("enclave_analysis_outcomes_total", {"outcome": "completed"}) == 0
