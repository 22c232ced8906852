"""Settings of the gateway: environment variables prefixed ``ENCLAVE_GATEWAY_`` (shared connection
settings may also come from the plain ``ENCLAVE_`` prefix)."""

from __future__ import annotations

from pathlib import Path

from enclave_common.auth.dev_issuer import DEV_AUDIENCE, DEV_ISSUER
from enclave_common.settings import (
    DEFAULT_MAX_ELEMENTS_PER_INSTANCE,
    DEFAULT_MAX_INSTANCE_BYTES,
    BaseServiceSettings,
)
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from enclave_gateway.admission import DEFAULT_MAX_CONCURRENT_UPLOADS
from enclave_gateway.handoff import DEFAULT_SPOOL_MEMORY_TOTAL_BYTES

MIB = 1024 * 1024
GIB = 1024 * MIB


class GatewaySettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_GATEWAY_", extra="ignore", frozen=True)

    service_name: str = "gateway"
    http_port: int = 8080
    #: Every upload allocates many short-lived objects and almost no cycles: with Python's 700 the
    #: collector ran every few hundred objects. 50,000 takes 3-4 % off the upload path's CPU measured
    #: in-process (parse, validate, seal, envelopes; three alternating runs each); in bench-gateway
    #: the difference is within the run-to-run noise (docs/gateway.md).
    gc_threshold0: int | None = Field(default=50_000, ge=100)
    #: How clients reach this gateway (RetrieveURL in STOW responses).
    public_base_url: str = "http://127.0.0.1:8080"

    #: The ingest service's X25519 public key: the only key the gateway holds for the data path.
    ingest_public_key_file: Path | None = None
    #: Keyed-HMAC pseudonym key (base64, >= 32 bytes), shared with ingest; never an encryption key.
    pseudonym_key: SecretStr | None = None

    oidc_issuer: str = DEV_ISSUER
    oidc_audience: str = DEV_AUDIENCE
    oidc_jwks_url: str | None = None
    oidc_jwks_file: Path | None = None

    max_parts: int = Field(default=10_000, ge=1)
    #: At most deid's ``max_instance_bytes`` (see ``DEFAULT_MAX_INSTANCE_BYTES``): a larger instance
    #: would be acknowledged and then quarantined.
    max_instance_bytes: int = Field(default=DEFAULT_MAX_INSTANCE_BYTES, ge=1024)
    max_request_bytes: int = Field(default=4 * GIB, ge=1024)
    #: Data elements plus sequence items of one instance, all nesting levels: deid holds each as an
    #: object of about 1 KiB, so this bounds its memory where the byte limits cannot (an empty
    #: element is 8 bytes). Past it the instance is refused 0xA700 ``too_many_elements``.
    max_elements_per_instance: int = Field(default=DEFAULT_MAX_ELEMENTS_PER_INSTANCE, ge=1000)
    chunk_bytes: int = Field(default=1 * MIB, ge=4096, le=1 * MIB)
    #: Sealed instances wait here until the whole request is read (ciphertext only, unnamed files).
    spool_dir: Path = Path("/tmp/enclave-gateway-spool")  # noqa: S108 - an emptyDir in Kubernetes
    #: Sealed bytes all requests together may keep in ``spool_dir`` (None: no limit but the disk's).
    #: Set it below the spool volume's size (an emptyDir ``sizeLimit`` evicts the pod when passed) and
    #: at least ``max_request_bytes`` plus 1 % (sealing adds 20 bytes per 1 MiB chunk): past it an
    #: upload answers 503 ``spool_unavailable``.
    spool_disk_bytes: int | None = Field(default=None, ge=1)
    #: Sealed bytes one request may keep in memory before its instances spill to ``spool_dir``.
    spool_memory_bytes: int = Field(default=4 * MIB, ge=0, le=64 * MIB)
    #: Sealed bytes all requests of the process together may keep in memory: past it, further
    #: chunks spill to ``spool_dir`` as past ``spool_memory_bytes`` (a quarter of the 1 Gi pod limit).
    spool_memory_total_bytes: int = Field(default=DEFAULT_SPOOL_MEMORY_TOTAL_BYTES, ge=0)
    #: Uploads (STOW-RS and the form upload) the process receives at once: each holds about 1 to 2.5
    #: MiB outside the spool's budgets (admission.py). Past it an upload answers 503
    #: ``too_many_uploads`` with Retry-After before its body is read; other routes do not count.
    max_concurrent_uploads: int = Field(default=DEFAULT_MAX_CONCURRENT_UPLOADS, ge=1)
    #: A request body that sends nothing for this long is cut off (slow-loris protection).
    body_idle_timeout_s: float = Field(default=30.0, gt=0)
    #: After the grace period, a body must arrive at this average rate at least (a trickle that
    #: never goes idle would otherwise hold a connection and a spool file forever).
    body_min_rate_bytes_per_s: int = Field(default=1024, ge=1)
    body_min_rate_grace_s: float = Field(default=30.0, gt=0)
    #: Allow-lists; None = every Storage SOP class / the default transfer syntaxes.
    allowed_sop_classes: list[str] | None = None
    allowed_transfer_syntaxes: list[str] | None = None

    rate_limit_burst: int = Field(default=120, ge=1)
    rate_limit_per_second: float = Field(default=40.0, gt=0)
    publish_timeout_s: float = Field(default=15.0, gt=0)
    #: Seconds each database read of the status, results and patient routes may take, and each lookup
    #: of grants and restrictions a request's decision makes, server selection included; past it the
    #: route answers 503 ``dependency_unavailable`` (a database that did not answer took about 30 s
    #: before: pymongo's monitor cycle).
    read_timeout_s: float = Field(default=10.0, gt=0, le=120)
    #: Seconds each database write of an upload's records may take, server selection included; past
    #: it the upload answers 503 ``database_unavailable`` (a database that did not answer took about
    #: 30 s before, holding the upload's slot and its client). A write given up on may still be
    #: applied: the retry's instances are ingest's duplicates, as after any such 503.
    write_timeout_s: float = Field(default=10.0, gt=0, le=120)
    #: Seconds between rounds of the sweep that records revocations Kafka refused to record when
    #: they were made (enclave_gateway.revocations); a revocation is swept once it is older than
    #: twice ``publish_timeout_s`` plus 30 s.
    revocation_sweep_interval_s: float = Field(default=60.0, ge=0.5, le=3600)
    #: Seconds between reads of the token revocations (POST /api/v1/token-revocations): the longest a
    #: revoked token is still accepted by a replica other than the one that stored the revocation.
    token_revocation_refresh_s: float = Field(default=5.0, ge=0.5, le=300)
    #: Seconds a token revocation is kept: at least the longest lifetime of the access tokens the
    #: identity provider issues (every token it could refuse has expired by then).
    token_revocation_retention_s: float = Field(default=86_400.0, ge=60, le=30 * 86_400)
    #: Patient keys one principal may look up per hour (POST /api/v1/patient-keys; 429 past it): a
    #: privacy office answers a few accountings a day, and a key, with the audit trail, tells whether
    #: someone is a patient.
    patient_key_lookups_per_hour: int = Field(default=60, ge=1, le=10_000)

    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @model_validator(mode="after")
    def _spool_holds_the_largest_request(self) -> GatewaySettings:
        disk = self.spool_disk_bytes
        if disk is not None and disk < self.max_request_bytes * 1.01:
            raise ValueError(
                f"ENCLAVE_GATEWAY_SPOOL_DISK_BYTES ({disk}) must be at least ENCLAVE_GATEWAY_MAX_REQUEST_BYTES "
                f"({self.max_request_bytes}) plus 1 %, or a request of the largest allowed size could never "
                "be held"
            )
        return self
