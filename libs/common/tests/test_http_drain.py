"""Requests open at a stop get the service's ``http_drain_s`` to finish: a 1 GiB STOW upload takes
about 35 s, and uvicorn's graceful timeout was a constant 20 s that a rolling update cut it at."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn
from enclave_common import service
from enclave_common.settings import BaseServiceSettings
from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict


class DemoSettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_DEMO_", extra="ignore", frozen=True)
    service_name: str = "demo"


class RecordingServer:
    """Stands in for uvicorn.Server: keeps the config it was given and serves nothing."""

    configs: list[uvicorn.Config] = []

    def __init__(self, config: uvicorn.Config) -> None:
        self.configs.append(config)
        self.started = False

    def run(self, sockets: Any = None) -> None:
        self.started = True


def _app() -> FastAPI:
    app = FastAPI()
    app.state.runtime = SimpleNamespace(check_configuration=lambda: None)
    return app


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[uvicorn.Config]:
    RecordingServer.configs = []
    monkeypatch.setattr(uvicorn, "Server", RecordingServer)
    monkeypatch.setattr(service, "configure_logging", lambda *_: None)
    monkeypatch.setattr("sys.argv", ["enclave-demo"])
    return RecordingServer.configs


def test_run_service_gives_open_requests_the_drain_setting(
    served: list[uvicorn.Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENCLAVE_DEMO_HTTP_DRAIN_S", "150")
    service.run_service(_app, DemoSettings())
    [config] = served
    assert config.timeout_graceful_shutdown == 150


def test_the_drain_defaults_to_what_it_was(served: list[uvicorn.Config]) -> None:
    service.run_service(_app, DemoSettings())
    [config] = served
    assert config.timeout_graceful_shutdown == 20


@pytest.mark.parametrize("seconds", ["0", "601"])
def test_a_drain_outside_1_to_600_s_is_refused(monkeypatch: pytest.MonkeyPatch, seconds: str) -> None:
    monkeypatch.setenv("ENCLAVE_DEMO_HTTP_DRAIN_S", seconds)
    with pytest.raises(ValidationError, match="http_drain_s"):
        DemoSettings()
