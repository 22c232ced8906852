"""Settings of the deid service: environment variables prefixed ``ENCLAVE_DEID_``
(shared connection settings may also come from the plain ``ENCLAVE_`` prefix).

Per-tenant policies are one JSON setting, e.g.
``ENCLAVE_DEID_TENANT_POLICIES='{"hospital-a": {"retain_patient_characteristics": true}}'``:
a tenant listed there gets exactly that policy (unset options are off); every other tenant gets
``ENCLAVE_DEID_DEFAULT_POLICY``.
"""

from __future__ import annotations

from pathlib import Path

from enclave_common.errors import ConfigurationError
from enclave_common.settings import (
    DEFAULT_MAX_ELEMENTS_PER_INSTANCE,
    DEFAULT_MAX_INSTANCE_BYTES,
    BaseServiceSettings,
)
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from enclave_deid.policy import DeidPolicy


class DeidSettings(BaseServiceSettings):
    model_config = SettingsConfigDict(env_prefix="ENCLAVE_DEID_", extra="ignore", frozen=True)

    service_name: str = "deid"
    http_port: int = 8082

    #: Where ingest keeps the encrypted originals and their study-key records.
    originals_bucket: str = "enclave-originals"
    #: The ingest KEK, to open study keys of originals: a keyring file (dev) or a KMS key id (Decrypt only).
    originals_keyring_file: Path | None = None
    originals_kms_key_id: str | None = None
    #: The deid key domain (a separate KEK): wraps one DEK per de-identified object.
    keyring_file: Path | None = None
    kms_key_id: str | None = None
    #: Wraps the DEKs of linkage records; defaults to the deid KEK. In production, a KMS key whose Decrypt
    #: is granted to the break-glass role only (the service needs GenerateDataKey on it, never Decrypt).
    linkage_keyring_file: Path | None = None
    linkage_kms_key_id: str | None = None
    deidentified_bucket: str = "enclave-deidentified"

    #: Keyed-HMAC key of the de-identified output (PatientID pseudonym, UIDs, date shift): base64 of
    #: >= 32 bytes, in the value or in a file. Its own key domain, never the gateway/ingest key.
    pseudonym_key: SecretStr | None = None
    pseudonym_key_file: Path | None = None

    #: Options for tenants not listed in ``tenant_policies``: the Basic Profile plus Retain Longitudinal
    #: Temporal Information with Modified Dates (volumetrics over time needs the intervals, not the dates).
    default_policy: DeidPolicy = DeidPolicy(retain_longitudinal_modified_dates=True)
    tenant_policies: dict[str, DeidPolicy] = Field(default_factory=dict)

    #: De-identification parses the whole instance in memory (peak 3x its size, measured): instances above
    #: this are quarantined with reason ``instance_too_large``. 768 MiB fits the 3 GiB pod memory limit of
    #: deploy/k8s; raise both together (2 GiB instances need about 6.5 GiB), and the gateway's limit with
    #: them (``DEFAULT_MAX_INSTANCE_BYTES``).
    max_instance_bytes: int = Field(default=DEFAULT_MAX_INSTANCE_BYTES, ge=1024)
    #: Each parsed data element or sequence item costs about 1 KiB of memory whatever its size (an
    #: instance of a few MiB can hold millions): instances with more data elements plus sequence items
    #: than this are quarantined with reason ``instance_too_complex``, counted before the parse. The
    #: default, 400,000, is what the 3 GiB pod holds next to an instance at ``max_instance_bytes``
    #: (``enclave_common.settings.DEFAULT_MAX_ELEMENTS_PER_INSTANCE``); the gateway refuses more at the edge (same default).
    max_elements_per_instance: int = Field(default=DEFAULT_MAX_ELEMENTS_PER_INSTANCE, ge=1000)
    #: Where the ciphertext of a de-identified copy waits for its upload (never plaintext).
    work_dir: Path | None = None

    def policy_for(self, tenant: str) -> DeidPolicy:
        """The policy of ``tenant``: its own entry, else the default."""
        return self.tenant_policies.get(tenant, self.default_policy)

    def pseudonym_key_base64(self) -> str | None:
        """The pseudonym key as base64 text, from the value or the file (the file wins when both are set)."""
        if self.pseudonym_key_file is not None:
            try:
                return self.pseudonym_key_file.read_text().strip()
            except OSError as exc:
                raise ConfigurationError(
                    f"ENCLAVE_DEID_PSEUDONYM_KEY_FILE cannot be read ({type(exc).__name__})"
                ) from exc
        return self.pseudonym_key.get_secret_value() if self.pseudonym_key else None
