"""Settings of the gateway service: environment variables prefixed ``ENCLAVE_GATEWAY_``
(shared connection settings may also come from the plain ``ENCLAVE_`` prefix)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from enclave_common.settings import BaseServiceSettings


class GatewaySettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_GATEWAY_", extra="ignore", frozen=True)

    service_name: str = "gateway"
    http_port: int = 8080
