"""Wiring of the audit service: the only place that builds clients."""

from __future__ import annotations

from fastapi import FastAPI

from enclave_common.service import ServiceRuntime, run_service
from enclave_audit.config import AuditSettings


def create_app(settings: AuditSettings | None = None) -> FastAPI:
    settings = settings or AuditSettings()
    runtime = ServiceRuntime(settings)
    return runtime.http_app(title="Enclave audit")


def run() -> None:
    run_service(create_app, AuditSettings())


if __name__ == "__main__":
    run()
