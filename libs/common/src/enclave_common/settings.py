"""Settings base shared by every service (pydantic-settings).

Each service subclasses :class:`BaseServiceSettings` with its own env prefix
(``ENCLAVE_<SERVICE>_``); connection settings common to all services are read from the shared
``ENCLAVE_`` prefix as well, so one environment can point all five at the same Kafka, S3 and
MongoDB. Secrets are ``SecretStr`` and a placeholder secret is refused outside ``dev``.
"""

from __future__ import annotations

from typing import Literal

from cryptography import x509
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

Environment = Literal["dev", "test", "staging", "prod"]

#: Values that mean "nobody set this": refused as secrets outside dev/test.
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "secret", "password", "enclave-dev-secret", "dev", "test", "minioadmin"}
)

#: The largest DICOM instance the pipeline takes, by default: the gateway refuses larger ones at upload
#: (413 ``instance_too_large``) and deid quarantines them. design.md's edge limit
#: is 2 GiB, but de-identification parses an instance whole (peak about 3x its size, measured), and
#: 768 MiB is what fits deid's 3 GiB pod memory in deploy/k8s. One default for both services, so a
#: hospital learns at upload what the pipeline cannot process, not later from a quarantined status.
#: Raise ``ENCLAVE_GATEWAY_MAX_INSTANCE_BYTES`` and ``ENCLAVE_DEID_MAX_INSTANCE_BYTES`` together, or both
#: at once with ``ENCLAVE_MAX_INSTANCE_BYTES`` (with deid's memory: 2 GiB instances need about 6.5 GiB).
DEFAULT_MAX_INSTANCE_BYTES = 768 * 1024 * 1024
#: Data elements plus sequence items one instance may hold, for deid (which holds each as about 1 KiB:
#: its 3 GiB pod holds 400,000 next to an instance at ``DEFAULT_MAX_INSTANCE_BYTES``) and for the
#: gateway, which refuses an instance deid would refuse where the client is told.
DEFAULT_MAX_ELEMENTS_PER_INSTANCE = 400_000


class BaseServiceSettings(BaseSettings):
    """Connection and runtime settings every service shares."""

    model_config = SettingsConfigDict(env_prefix="ENCLAVE_", extra="ignore", frozen=True)

    environment: Environment = "dev"
    service_name: str = "enclave"
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    #: Bind with SO_REUSEPORT, so several replicas of a service on one host share the port and the
    #: kernel spreads connections over them (a Python process uses one core).
    http_reuse_port: bool = False
    #: How long requests still open at a stop may run before they are cancelled (uvicorn's
    #: ``timeout_graceful_shutdown``). Long enough for the largest request the service takes at the
    #: rate it is served (deploy/k8s sets it per service and counts it in the pod's grace period).
    http_drain_s: int = Field(default=20, ge=1, le=600)
    #: Request line plus headers, in bytes; larger requests get 431 (a bearer token is 1-4 KiB).
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    #: Request body, in bytes, on every route but those that stream their bodies with limits of their
    #: own (the gateway's uploads: ``max_request_bytes``); larger bodies get 413 before any route or
    #: authentication runs. The largest body a route takes is a grant request, under 2 KiB.
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    #: How long such a body may take to arrive, in seconds waited for it in all; then 408 and the
    #: connection is closed (a body that stops, or never ends, holds no connection).
    body_timeout_s: float = Field(default=30.0, gt=0, le=600)
    #: How long a request's line and headers may take to arrive, from the connection's opening or
    #: the request's first byte, in seconds in all; then 408 and the connection is closed (a
    #: connection that sent no request is closed). Real clients send a head in one packet.
    http_header_timeout_s: float = Field(default=20.0, gt=0, le=600)
    log_level: str = "INFO"
    #: Python's generation-0 garbage-collection threshold (allocations between collections), set
    #: with ``gc.freeze()`` of what startup allocated; None keeps Python's default (700).
    gc_threshold0: int | None = Field(default=None, ge=100)

    kafka_bootstrap_servers: str = "127.0.0.1:19092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_SSL"] = "PLAINTEXT"
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_max_message_bytes: int = 2 * 1024 * 1024
    #: How long a Kafka consumer may stay unable to consume, counted only while Kafka answers, before
    #: ``/healthz`` fails and Kubernetes restarts the pod: by then the consumer watchdog's own restarts
    #: have not helped. At least one full watchdog cycle on its slowest path (coordinator unknown 60 s,
    #: a stop 40 s, a start 60 s, that start's stop 40 s, the next check 5 s), so that a restart that
    #: succeeds never fails liveness; the default leaves room for a second restart.
    kafka_consumer_stuck_s: int = Field(default=300, ge=210, le=3600)
    #: How long a Kafka producer may stay unable to publish (its sender ended, and no replacement has
    #: held), counted only while Kafka answers, before ``/healthz`` fails and Kubernetes restarts the
    #: pod. Its own setting: the producer watchdog's cycle is shorter than the consumer's (the next
    #: check 5 s, a replacement 60 s, Kafka's ping 3 s, the round that sees the new sender run 5 s and
    #: its ping 3 s), and a site may want a gateway that can publish nothing (every upload 503)
    #: restarted sooner than the consumers' 210 s floor allows.
    kafka_producer_stuck_s: int = Field(default=300, ge=90, le=3600)

    mongo_url: SecretStr = SecretStr("mongodb://127.0.0.1:27018/")

    s3_endpoint_url: str | None = "http://127.0.0.1:19000"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    #: PEM file of the CA certificates that sign the object store's TLS certificate (an on-premises
    #: S3 with a private CA). Unset: the system's trust store. For the object store only: AWS KMS
    #: keeps the public trust store (``AWS_CA_BUNDLE`` would replace it for every AWS call).
    s3_ca_bundle: str | None = None
    #: Whether a service creates its bucket at start, and turns on versioning and default encryption
    #: where they are off. An existing configuration is never replaced (an SSE-KMS default stays
    #: SSE-KMS). False when the buckets are provisioned beforehand and the service's S3 user may
    #: only read their configuration: the service then checks it and refuses to start, saying what
    #: is missing.
    s3_create_buckets: bool = True

    #: Where OpenTelemetry spans go: "none", "console", "otlp" (OTEL_EXPORTER_OTLP_* env) or "file".
    tracing_exporter: Literal["none", "console", "otlp", "file"] = "none"
    tracing_file: str | None = None

    #: Retries of transient errors inside one delivery before the message is redelivered.
    retry_attempts: int = Field(default=5, ge=1)
    retry_base_delay_s: float = Field(default=0.2, gt=0)
    retry_max_delay_s: float = Field(default=10.0, gt=0)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Service prefix first (``ENCLAVE_GATEWAY_KAFKA_...``), then the shared ``ENCLAVE_`` prefix."""
        shared = EnvSettingsSource(settings_cls, env_prefix="ENCLAVE_")
        return (init_settings, env_settings, shared, dotenv_settings, file_secret_settings)

    @property
    def mongo_database(self) -> str:
        """Each service owns one database, named after it."""
        return self.service_name

    @field_validator("s3_ca_bundle")
    @classmethod
    def _readable_ca_bundle(cls, path: str | None) -> str | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as handle:
                found = x509.load_pem_x509_certificates(handle.read())
        except OSError as exc:
            raise ValueError(f"cannot read {path} ({exc.strerror or type(exc).__name__})") from None
        except ValueError:
            found = []
        if not found:
            raise ValueError(f"{path} holds no PEM certificate (BEGIN CERTIFICATE)")
        return path

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> BaseServiceSettings:
        if self.environment in ("dev", "test"):
            return self
        for name, value in self:
            if (
                isinstance(value, SecretStr)
                and value.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS
            ):
                raise ValueError(
                    f"setting {name!r} holds a placeholder secret; in environment "
                    f"{self.environment!r} set a real value (placeholders are accepted only in dev/test)"
                )
        return self
