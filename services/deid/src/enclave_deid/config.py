"""Settings of the deid service: environment variables prefixed ``ENCLAVE_DEID_``
(shared connection settings may also come from the plain ``ENCLAVE_`` prefix)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from enclave_common.settings import BaseServiceSettings


class DeidSettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_DEID_", extra="ignore", frozen=True)

    service_name: str = "deid"
    http_port: int = 8082
