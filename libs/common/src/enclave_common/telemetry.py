"""OpenTelemetry setup. Spans go nowhere by default; to the console, an OTLP collector, or a
JSON-lines file (used by the tests that check one upload is one trace across all services)."""

from __future__ import annotations

import json
from typing import IO

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from enclave_common.settings import BaseServiceSettings


def _attribute(value: object) -> object:
    if isinstance(value, bytes | bytearray):
        return value.decode("ascii", "replace")
    if isinstance(value, tuple | list):
        return [_attribute(v) for v in value]
    return value


def _one_line(span: ReadableSpan) -> str:
    """One span as a JSON line; bytes attributes (FastStream sets the Kafka key as bytes) become text."""
    context = span.get_span_context()
    record = {
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "kind": span.kind.name,
        "trace_id": f"{context.trace_id:032x}" if context else None,
        "span_id": f"{context.span_id:016x}" if context else None,
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "start_time": span.start_time,
        "end_time": span.end_time,
        "status": span.status.status_code.name,
        "attributes": {k: _attribute(v) for k, v in (span.attributes or {}).items()},
    }
    return json.dumps(record, separators=(",", ":")) + "\n"


def build_tracer_provider(settings: BaseServiceSettings) -> tuple[TracerProvider, IO[str] | None]:
    """A tracer provider for one service; returns the opened span file (to close on shutdown), if any.

    With no exporter nothing is recorded (``ALWAYS_OFF``): spans would cost CPU on every request and
    event and go nowhere (trace context is still created and travels in Kafka headers). With an
    exporter the sampler is OpenTelemetry's default, which reads the standard ``OTEL_TRACES_SAMPLER``
    / ``OTEL_TRACES_SAMPLER_ARG`` (e.g. ``parentbased_traceidratio`` and ``0.1`` to record one upload
    in ten, whole across the services).
    """
    resource = Resource.create({"service.name": f"enclave-{settings.service_name}"})
    if settings.tracing_exporter == "none":
        return TracerProvider(resource=resource, sampler=ALWAYS_OFF), None
    provider = TracerProvider(resource=resource)
    handle: IO[str] | None = None
    if settings.tracing_exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(formatter=_one_line)))
    elif settings.tracing_exporter == "file":
        path = settings.tracing_file or f"{settings.service_name}-spans.jsonl"
        handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the service on shutdown
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=handle, formatter=_one_line)))
    elif settings.tracing_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider, handle
