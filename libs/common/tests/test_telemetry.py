"""Tracing: nothing is recorded without an exporter; with one, spans are recorded and written, and
trace context propagates either way."""

from __future__ import annotations

import json
from pathlib import Path

from enclave_common.settings import BaseServiceSettings
from enclave_common.telemetry import build_tracer_provider
from opentelemetry import propagate


def test_without_an_exporter_spans_are_not_recorded_but_context_still_propagates() -> None:
    provider, handle = build_tracer_provider(BaseServiceSettings(tracing_exporter="none"))
    assert handle is None
    with provider.get_tracer("t").start_as_current_span("request") as span:
        assert not span.is_recording()
        assert span.get_span_context().is_valid
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
    assert carrier["traceparent"].split("-")[1] == f"{span.get_span_context().trace_id:032x}"


def test_with_an_exporter_spans_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    provider, handle = build_tracer_provider(
        BaseServiceSettings(tracing_exporter="file", tracing_file=str(path))
    )
    with provider.get_tracer("t").start_as_current_span("request") as span:
        assert span.is_recording()
    provider.shutdown()
    assert handle is not None
    handle.close()
    (line,) = path.read_text().splitlines()
    assert json.loads(line)["name"] == "request"
