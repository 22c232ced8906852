"""Settings of the ingest service: environment variables prefixed ``ENCLAVE_INGEST_``
(shared connection settings may also come from the plain ``ENCLAVE_`` prefix)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from enclave_common.settings import BaseServiceSettings


class IngestSettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_INGEST_", extra="ignore", frozen=True)

    service_name: str = "ingest"
    http_port: int = 8081
