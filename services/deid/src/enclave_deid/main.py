"""Wiring of the deid service: the only place that builds clients."""

from __future__ import annotations

from fastapi import FastAPI

from enclave_common.service import ServiceRuntime, run_service
from enclave_deid.config import DeidSettings


def create_app(settings: DeidSettings | None = None) -> FastAPI:
    settings = settings or DeidSettings()
    runtime = ServiceRuntime(settings)
    return runtime.http_app(title="Enclave de-identification")


def run() -> None:
    run_service(create_app, DeidSettings())


if __name__ == "__main__":
    run()
