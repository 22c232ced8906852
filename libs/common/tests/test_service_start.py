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


def test_a_tls_failure_with_kms_is_named_kms_without_the_object_store_hint() -> None:
    """KMS keeps the public trust store (``ENCLAVE_S3_CA_BUNDLE`` is the object store's only)."""
    import ssl

    from botocore.exceptions import SSLError
    from enclave_common.errors import startup_failure

    reason = "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer"
    error = ssl.SSLError(1, f"{reason} (_ssl.c:1006)")  # as OpenSSL words it
    kms = SSLError(endpoint_url="https://kms.eu-central-1.amazonaws.com/", error=error)
    assert startup_failure(kms) == f"TLS with AWS KMS failed: {reason}"
    s3 = SSLError(endpoint_url="https://s3.example.org/bucket", error=error)
    assert startup_failure(s3).startswith(f"TLS with the object store failed: {reason} (an object store")
