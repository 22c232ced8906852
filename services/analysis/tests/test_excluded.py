"""Quarantined and rejected instances settle the series their upload touched, like de-identified
ones: the series document alone then says whether the series is complete. (A quarantined one was
passed with its arguments shifted, a TypeError, until the ninth session; a rejected one only updated
its member document.)"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from enclave_analysis.config import AnalysisSettings
from enclave_analysis.handlers import AnalysisService
from enclave_common import topics
from enclave_common.envelope import Envelope
from enclave_common.events import InstanceQuarantined, InstanceRejected
from prometheus_client import CollectorRegistry


class RecordingAssembly:
    def __init__(self) -> None:
        self.settled: list[tuple[Any, ...]] = []

    async def settle(self, *args: Any) -> None:
        self.settled.append(args)


def service() -> tuple[AnalysisService, RecordingAssembly]:
    assembly = RecordingAssembly()
    runtime = SimpleNamespace(registry=CollectorRegistry())
    return AnalysisService(runtime, AnalysisSettings(), assembly, None, None), assembly  # type: ignore[arg-type]


def envelope(topic: str, data: Any) -> Envelope:
    return Envelope.for_topic(
        topic, data, source="deid", tenant="hospital-a", actor="service:x", correlation_id="up-1"
    )


async def test_a_quarantined_instance_settles_its_series_and_its_upload() -> None:
    analysis, assembly = service()
    data = InstanceQuarantined(
        upload_id="up-1",
        instance_upload_id="iu-1",
        study_key="st",
        series_key="se",
        reason_code="burned_in_risk",
        reason="BurnedInAnnotation is YES",
    )
    event = envelope(topics.INSTANCE_QUARANTINED, data)
    await analysis.on_excluded(event)
    assert assembly.settled == [
        (
            "hospital-a",
            "se",
            "iu-1",
            "up-1",
            "excluded",
            {"reason_code": "burned_in_risk"},
            "up-1",
            event.time,
        )
    ]


async def test_a_rejected_instance_settles_the_series_of_its_upload() -> None:
    analysis, assembly = service()
    data = InstanceRejected(
        upload_id="up-1", instance_upload_id="iu-2", reason_code="integrity", reason="sha-256 differs"
    )
    event = envelope(topics.INSTANCE_REJECTED, data)
    await analysis.on_excluded(event)
    assert assembly.settled == [
        ("hospital-a", None, "iu-2", "up-1", "excluded", {"reason_code": "integrity"}, "up-1", event.time)
    ]
