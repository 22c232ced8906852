"""Wiring of the ingest service: the only place that builds clients."""

from __future__ import annotations

from fastapi import FastAPI

from enclave_common.service import ServiceRuntime, run_service
from enclave_ingest.config import IngestSettings


def create_app(settings: IngestSettings | None = None) -> FastAPI:
    settings = settings or IngestSettings()
    runtime = ServiceRuntime(settings)
    return runtime.http_app(title="Enclave ingest")


def run() -> None:
    run_service(create_app, IngestSettings())


if __name__ == "__main__":
    run()
