"""Settings of the analysis service: environment variables prefixed ``ENCLAVE_ANALYSIS_``
(shared connection settings may also come from the plain ``ENCLAVE_`` prefix)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from enclave_common.settings import BaseServiceSettings


class AnalysisSettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_ANALYSIS_", extra="ignore", frozen=True)

    service_name: str = "analysis"
    http_port: int = 8083
