"""Wiring of the gateway service: the only place that builds clients."""

from __future__ import annotations

from fastapi import FastAPI

from enclave_common.service import ServiceRuntime, run_service
from enclave_gateway.config import GatewaySettings


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    runtime = ServiceRuntime(settings)
    return runtime.http_app(title="Enclave gateway")


def run() -> None:
    run_service(create_app, GatewaySettings())


if __name__ == "__main__":
    run()
