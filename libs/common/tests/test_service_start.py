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


async def test_a_startup_step_failing_otherwise_logs_what_failed_without_its_text() -> None:
    """A third-party message may quote data: the line names the dependency and the type only."""
    from pymongo.errors import ServerSelectionTimeoutError

    runtime = ServiceRuntime(BaseServiceSettings(service_name="start-test"))

    async def unreachable() -> None:
        raise ServerSelectionTimeoutError("127.0.0.1:27018: [Errno 111] Connection refused, PN-SECRET")

    runtime.on_startup(unreachable)
    with capture_logs() as logs, pytest.raises(ServerSelectionTimeoutError):
        await runtime.start()
    [line] = [entry for entry in logs if entry["event"] == "cannot start"]
    assert line["reason"] == "the database is unavailable (ServerSelectionTimeoutError)"


def test_a_ca_bundle_that_is_missing_or_holds_no_certificate_is_refused_by_name(tmp_path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cannot read .*missing.pem"):
        BaseServiceSettings(service_name="t", s3_ca_bundle=str(tmp_path / "missing.pem"))
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValidationError, match="holds no PEM certificate"):
        BaseServiceSettings(service_name="t", s3_ca_bundle=str(tmp_path / "key.pem"))
