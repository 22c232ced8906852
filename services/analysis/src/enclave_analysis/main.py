"""Wiring of the analysis service: the only place that builds clients."""

from __future__ import annotations

from fastapi import FastAPI

from enclave_common.service import ServiceRuntime, run_service
from enclave_analysis.config import AnalysisSettings


def create_app(settings: AnalysisSettings | None = None) -> FastAPI:
    settings = settings or AnalysisSettings()
    runtime = ServiceRuntime(settings)
    return runtime.http_app(title="Enclave analysis")


def run() -> None:
    run_service(create_app, AnalysisSettings())


if __name__ == "__main__":
    run()
