"""Settings of the ingest service: environment variables prefixed ``ENCLAVE_INGEST_``
(shared connection settings may also come from the plain ``ENCLAVE_`` prefix)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from enclave_common.settings import BaseServiceSettings
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict


class IngestSettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_INGEST_", extra="ignore", frozen=True)

    service_name: str = "ingest"
    http_port: int = 8081

    #: X25519 private key the gateway seals to (PEM, DER or raw 32 bytes in a file).
    private_key_file: Path | None = None
    #: KEK provider: a local versioned keyring file (dev/tests) or an AWS KMS key id/ARN.
    keyring_file: Path | None = None
    kms_key_id: str | None = None
    #: Keyed-HMAC pseudonym key (base64 of >= 32 bytes), shared with the gateway, never an encryption key.
    pseudonym_key: SecretStr | None = None

    originals_bucket: str = "enclave-originals"
    #: Same SOP Instance UID with different content: refuse it, or keep it as a new version.
    duplicate_policy: Literal["reject", "new_version"] = "reject"
    #: Where sealed chunks wait until their instance is complete (ciphertext only; safe to lose).
    spool_dir: Path = Path("/tmp/enclave-ingest-spool")  # noqa: S108 - an emptyDir in Kubernetes
    #: The size of the spool's volume (the emptyDir's sizeLimit; deploy/k8s sets it), published as
    #: ``enclave_ingest_spool_capacity_bytes`` for the alert EnclaveIngestSpoolFilling. Not a limit:
    #: the spool holds what unfinished instances need (docs/ingest.md § The spool's size).
    spool_capacity_bytes: int | None = Field(default=None, ge=1)
    #: An instance whose upload broke off is given up (``upload_incomplete``) once its partition holds
    #: a record appended this long after its newest chunk (Kafka timestamps; see ``spool``). The gateway
    #: appends an instance's chunks within one request; the margin covers clocks of gateway replicas.
    incomplete_after_s: float = Field(default=3600.0, gt=0)
    #: Bytes of decrypted header kept in memory to parse and re-validate the instance.
    header_prefix_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)
    segment_size: int = Field(default=1024 * 1024, ge=4096)
