from __future__ import annotations

import json

import pytest
from enclave_common.service import load_settings
from enclave_common.settings import BaseServiceSettings
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict


class DemoSettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_DEMO_", extra="ignore", frozen=True)
    service_name: str = "demo"
    max_instance_bytes: int = 1024


def test_service_prefix_wins_over_shared_prefix(monkeypatch):
    monkeypatch.setenv("ENCLAVE_KAFKA_BOOTSTRAP_SERVERS", "shared:9092")
    assert DemoSettings().kafka_bootstrap_servers == "shared:9092"
    monkeypatch.setenv("ENCLAVE_DEMO_KAFKA_BOOTSTRAP_SERVERS", "own:9092")
    assert DemoSettings().kafka_bootstrap_servers == "own:9092"


def test_placeholder_secret_refused_outside_dev(monkeypatch):
    monkeypatch.setenv("ENCLAVE_DEMO_ENVIRONMENT", "prod")
    monkeypatch.setenv("ENCLAVE_DEMO_S3_SECRET_ACCESS_KEY", "changeme")
    with pytest.raises(ValidationError, match="placeholder secret"):
        DemoSettings()
    monkeypatch.setenv("ENCLAVE_DEMO_S3_SECRET_ACCESS_KEY", "a-real-long-random-value")
    monkeypatch.setenv("ENCLAVE_DEMO_MONGO_URL", "mongodb://user:pw@db:27017/")
    assert DemoSettings().environment == "prod"


def test_placeholder_secret_accepted_in_dev(monkeypatch):
    monkeypatch.setenv("ENCLAVE_DEMO_S3_SECRET_ACCESS_KEY", "changeme")
    assert DemoSettings().s3_secret_access_key is not None


def test_secrets_are_not_rendered(monkeypatch):
    monkeypatch.setenv("ENCLAVE_DEMO_S3_SECRET_ACCESS_KEY", "s3cr3t-value")
    s = DemoSettings()
    assert "s3cr3t-value" not in repr(s) and "s3cr3t-value" not in str(s.model_dump())


@pytest.mark.parametrize(
    ("variable", "named"),
    [
        # A shared setting set under the shared prefix: that variable is named, not one nobody set.
        ("ENCLAVE_ENVIRONMENT", "ENCLAVE_ENVIRONMENT"),
        ("ENCLAVE_DEMO_ENVIRONMENT", "ENCLAVE_DEMO_ENVIRONMENT"),
        # The shared prefix reaches a service's own settings too (one value for two services).
        ("ENCLAVE_MAX_INSTANCE_BYTES", "ENCLAVE_MAX_INSTANCE_BYTES"),
    ],
)
def test_a_setting_that_does_not_parse_is_named_by_the_variable_that_holds_it(
    monkeypatch, capsys, variable, named
):
    monkeypatch.setenv(variable, "banana")
    with pytest.raises(SystemExit) as stopped:
        load_settings(DemoSettings)
    assert stopped.value.code == 2
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert verdict["configuration"] == "invalid"
    assert verdict["reason"].startswith(f"{named}: Input should be ")
    assert "banana" not in verdict["reason"]


def test_a_service_without_a_key_encryption_key_is_told_which_variables_to_set():
    """Before: "set a keyring file or a KMS key id", naming no variable."""
    from enclave_common.errors import ConfigurationError
    from enclave_common.keys_config import kek_provider

    with pytest.raises(ConfigurationError) as missing:
        kek_provider(DemoSettings(), None, None)
    assert "ENCLAVE_DEMO_KEYRING_FILE" in missing.value.reason
    assert "ENCLAVE_DEMO_KMS_KEY_ID" in missing.value.reason
