"""A service that cannot start with its configuration says so in one log line before the traceback."""

from __future__ import annotations

import pytest
from enclave_common.errors import ConfigurationError
from enclave_common.service import ServiceRuntime
from enclave_common.settings import BaseServiceSettings
from structlog.testing import capture_logs


async def test_a_startup_step_refusing_the_configuration_logs_one_line_saying_what_to_fix() -> None:
    runtime = ServiceRuntime(BaseServiceSettings(service_name="start-test"))

    async def refuse() -> None:
        raise ConfigurationError("bucket b: versioning is not enabled")

    runtime.on_startup(refuse)
    with capture_logs() as logs, pytest.raises(ConfigurationError):
        await runtime.start()
    assert {
        "event": "cannot start",
        "reason": "bucket b: versioning is not enabled",
        "log_level": "error",
    } in logs
