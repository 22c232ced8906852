"""Settings of the audit service: environment variables prefixed ``ENCLAVE_AUDIT_``
(shared connection settings may also come from the plain ``ENCLAVE_`` prefix).

Anomaly thresholds are one nested setting: ``ENCLAVE_AUDIT_ANOMALY__AUTH_FAILURE_LIMIT=3`` or the
whole object as JSON in ``ENCLAVE_AUDIT_ANOMALY``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER
from enclave_common.settings import BaseServiceSettings
from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from enclave_audit.anomaly import AnomalyThresholds
from enclave_audit.checkpoints import MAX_CHECKPOINT_RECORDS

#: HIPAA: documentation of security activity is kept 6 years (45 CFR 164.316(b)(2)(i)).
SIX_YEARS_DAYS = 2192


class AuditSettings(BaseServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="ENCLAVE_AUDIT_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    service_name: str = "audit"
    http_port: int = 8084

    #: Ed25519 private key (PKCS#8 PEM) that signs checkpoints and evidence bundles.
    signing_key_file: Path | None = None
    #: Object-lock bucket (COMPLIANCE mode) holding the signed checkpoints.
    worm_bucket: str = "enclave-audit-worm"
    retention_days: int = Field(default=SIX_YEARS_DAYS, ge=1)

    #: Public keys (``*.pem``) of the other Ed25519 keys whose checkpoints are genuine: those that
    #: signed before a rotation, and the next one (set here before it replaces ``signing_key_file``,
    #: so no replica of a rolling update refuses the other's checkpoints). Without them, checkpoints
    #: signed before a rotation do not verify, and the checkpointer, which checks the last one before
    #: it signs, stops.
    trusted_public_keys_dir: Path | None = None

    #: A checkpoint is signed when this many records are pending ...
    checkpoint_every_records: int = Field(default=1000, ge=1, le=MAX_CHECKPOINT_RECORDS)
    #: ... or when records are pending and this many seconds passed since the last one.
    checkpoint_interval_s: float = Field(default=60.0, gt=0)
    #: Whether this replica signs checkpoints (one writer per deployment is enough; a second one
    #: is harmless: the checkpoint index is unique on the first sequence).
    checkpoint_writer: bool = True
    #: Whole-chain verification in the background (feeds the verify metrics the alerts watch).
    verify_interval_s: float = Field(default=3600.0, gt=0)

    #: Whether the service creates its indexes at start. In production it runs under the
    #: append-only role (``find``/``insert``), which cannot: set this to false there, run
    #: ``enclave-audit-migrate`` under the migration user at deploy time, and the service only checks
    #: at start that every index exists (and refuses to start, naming the missing ones, if not).
    create_indexes: bool = True

    #: How often the pattern subscriber refreshes topic metadata, i.e. how soon a new topic is audited.
    metadata_max_age_ms: int = Field(default=30_000, ge=1000)

    anomaly: AnomalyThresholds = AnomalyThresholds()

    #: Bearer tokens of the auditor API (enclave_common.auth): issuer, audience and where the keys are.
    oidc_issuer: str = DEV_ISSUER
    oidc_audience: str = DEV_AUDIENCE
    oidc_jwks_url: str | None = None
    oidc_jwks_file: Path | None = None
    oidc_algorithms: tuple[str, ...] = ("ES256", "RS256")
    #: Auditors of this tenant see every tenant's records and may export the chain (which spans all
    #: tenants); auditors of any other tenant query their own tenant's records only.
    operator_tenant: str = "enclave-operator"

    default_page_size: int = Field(default=100, ge=1)
    #: Records one export bundle may hold: it is built on the pod's /tmp (an emptyDir whose size
    #: limit evicts the pod) before it is sent, ~3.3 KB per record in all; larger ranges get 413.
    max_export_records: int = Field(default=200_000, ge=1)
    max_page_size: int = Field(default=1000, ge=1)
    #: Seconds an auditor's query (``GET /audit/events``) may take in the database: past it the call
    #: answers 503 ``query_timeout`` (narrow the query, or retry) and the database stops it, instead of
    #: holding the call, a connection and the database's CPU for as long as a scan of the trail lasts.
    query_timeout_s: float = Field(default=20.0, gt=0, le=600)
    #: Seconds between reads of the token revocations the consumer stored from the trail (an admin's
    #: POST /api/v1/token-revocations at the gateway): with Kafka's delivery, about how long a revoked
    #: token is still accepted by the auditor API.
    token_revocation_refresh_s: float = Field(default=5.0, ge=0.5, le=300)
    #: Seconds a token revocation is honoured: the gateway's ENCLAVE_GATEWAY_TOKEN_REVOCATION_RETENTION_S
    #: (at least the longest lifetime of the access tokens the identity provider issues).
    token_revocation_retention_s: float = Field(default=86_400.0, ge=60, le=30 * 86_400)
    #: Seconds each of those reads may take in the database.
    token_revocation_read_timeout_s: float = Field(default=10.0, gt=0, le=120)

    @property
    def retention(self) -> timedelta:
        return timedelta(days=self.retention_days)

    @model_validator(mode="after")
    def _page_sizes(self) -> AuditSettings:
        if self.default_page_size > self.max_page_size:
            raise ValueError("default_page_size must not exceed max_page_size")
        return self

    @model_validator(mode="after")
    def _token_keys(self) -> AuditSettings:
        # Without them every auditor query would answer 503 while the pod looks ready.
        if self.environment not in ("dev", "test") and not self.oidc_jwks_url and self.oidc_jwks_file is None:
            raise ValueError(
                "the auditor API has no token keys: set ENCLAVE_AUDIT_OIDC_JWKS_URL (or _JWKS_FILE), "
                "with ENCLAVE_AUDIT_OIDC_ISSUER and ENCLAVE_AUDIT_OIDC_AUDIENCE"
            )
        return self
