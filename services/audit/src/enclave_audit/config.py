"""Settings of the audit service: environment variables prefixed ``ENCLAVE_AUDIT_``
(shared connection settings may also come from the plain ``ENCLAVE_`` prefix)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from enclave_common.settings import BaseServiceSettings


class AuditSettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_AUDIT_", extra="ignore", frozen=True)

    service_name: str = "audit"
    http_port: int = 8084
