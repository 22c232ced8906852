"""OpenTelemetry setup. Spans go nowhere by default; to the console, an OTLP collector, or a
JSON-lines file (used by the tests that check one upload is one trace across all services)."""

from __future__ import annotations

from typing import IO

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

from enclave_common.settings import BaseServiceSettings


def _one_line(span: ReadableSpan) -> str:
    return span.to_json(indent=None) + "\n"


def build_tracer_provider(settings: BaseServiceSettings) -> tuple[TracerProvider, IO[str] | None]:
    """A tracer provider for one service; returns the opened span file (to close on shutdown), if any."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"enclave-{settings.service_name}"}))
    handle: IO[str] | None = None
    if settings.tracing_exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(formatter=_one_line)))
    elif settings.tracing_exporter == "file":
        path = settings.tracing_file or f"{settings.service_name}-spans.jsonl"
        handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the service on shutdown
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=handle, formatter=_one_line)))
    elif settings.tracing_exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter,
        )

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider, handle
