"""Wiring of the deid service: the only place that builds clients."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from enclave_common import topics
from enclave_common.crypto import KeyEncryptionKeyProvider
from enclave_common.errors import ConfigurationError
from enclave_common.keys_config import kek_provider
from enclave_common.service import ServiceRuntime, load_settings, local_disk_check, run_service
from enclave_common.storage import S3ObjectStore
from enclave_common.study_key_objects import StudyKeyObjects
from fastapi import FastAPI

from enclave_deid.config import DeidSettings
from enclave_deid.handlers import InstanceStoredHandler
from enclave_deid.linkage import LinkageVault
from enclave_deid.pipeline import DeidPipeline
from enclave_deid.pseudonym_keys import DeidPseudonymKeys
from enclave_deid.records import DeidRecords


@dataclass(frozen=True)
class DeidKeys:
    originals: KeyEncryptionKeyProvider
    deid: KeyEncryptionKeyProvider
    linkage: KeyEncryptionKeyProvider


def _kek(
    settings: DeidSettings, keyring_file: Path | None, kms_key_id: str | None, names: str
) -> KeyEncryptionKeyProvider:
    if keyring_file is None and not kms_key_id:
        raise ConfigurationError(f"no key-encryption key configured: set {names}")
    return kek_provider(settings, keyring_file, kms_key_id)


def load_keys(settings: DeidSettings) -> DeidKeys:
    """The three KEKs of the service (file reads or KMS clients: call at startup, not at construction)."""
    deid = _kek(
        settings,
        settings.keyring_file,
        settings.kms_key_id,
        "ENCLAVE_DEID_KEYRING_FILE or ENCLAVE_DEID_KMS_KEY_ID",
    )
    originals = _kek(
        settings,
        settings.originals_keyring_file,
        settings.originals_kms_key_id,
        "ENCLAVE_DEID_ORIGINALS_KEYRING_FILE or ENCLAVE_DEID_ORIGINALS_KMS_KEY_ID",
    )
    linkage = deid
    if settings.linkage_keyring_file is not None or settings.linkage_kms_key_id:
        linkage = kek_provider(settings, settings.linkage_keyring_file, settings.linkage_kms_key_id)
    return DeidKeys(originals=originals, deid=deid, linkage=linkage)


def load_checked_keys(settings: DeidSettings) -> DeidKeys:
    """The service's keys (``load_keys``) after its configuration guard: deid's pseudonym key must be
    its own, never the gateway/ingest ``ENCLAVE_PSEUDONYM_KEY``. The service and ``enclave-deid-redo``
    both call it, so neither makes copies under another key."""
    keys = load_keys(settings)
    pseudonym_key = settings.pseudonym_key_base64()
    if pseudonym_key and pseudonym_key == os.environ.get("ENCLAVE_PSEUDONYM_KEY"):
        own = {"ENCLAVE_DEID_PSEUDONYM_KEY", "ENCLAVE_DEID_PSEUDONYM_KEY_FILE"} & set(os.environ)
        raise ConfigurationError(
            # Unset, the shared ENCLAVE_ prefix would hand deid the gateway/ingest key: say so.
            (
                "the deid pseudonym key equals ENCLAVE_PSEUDONYM_KEY (gateway/ingest)"
                if own
                else "ENCLAVE_DEID_PSEUDONYM_KEY (or ENCLAVE_DEID_PSEUDONYM_KEY_FILE) is not set; deid never "
                "uses ENCLAVE_PSEUDONYM_KEY (gateway/ingest) in its place"
            )
            + ": set ENCLAVE_DEID_PSEUDONYM_KEY to a key of its own, so output pseudonyms cannot be "
            "recomputed from the ingest keys"
        )
    return keys


def build_pipeline(settings: DeidSettings, keys: DeidKeys, store: S3ObjectStore) -> DeidPipeline:
    """The pipeline of the service (and of ``enclave-deid-redo``, which must release what it releases)."""
    return DeidPipeline(
        store=store,
        study_keys=StudyKeyObjects(store, settings.originals_bucket, keys.originals),
        deid_kek=keys.deid,
        keys=DeidPseudonymKeys.from_base64(settings.pseudonym_key_base64(), "ENCLAVE_DEID_PSEUDONYM_KEY"),
        bucket=settings.deidentified_bucket,
        max_instance_bytes=settings.max_instance_bytes,
        max_elements=settings.max_elements_per_instance,
        work_dir=settings.work_dir,
    )


def create_app(settings: DeidSettings | None = None) -> FastAPI:
    settings = settings or DeidSettings()
    runtime = ServiceRuntime(settings)
    runtime.publishes(topics.INSTANCE_DEIDENTIFIED, topics.INSTANCE_QUARANTINED)
    # Published by the key, break-glass and redo commands (`enclave-deid-keys`, `enclave-deid-linkage`,
    # `enclave-deid-redo`, which also publishes the two topics above), run
    # in the service's pod with its Kafka identity: declared here so the AsyncAPI document, and the
    # Kafka ACLs checked against it, list them.
    runtime.publishes(topics.KEY_ROTATED, topics.ACCESS_RECORDED, topics.SECURITY_ALERT)
    store = S3ObjectStore(settings)
    records = DeidRecords(runtime.db)
    vault = LinkageVault(runtime.db)
    handler = InstanceStoredHandler(runtime, settings, records, vault)
    handler.register()
    runtime.readiness["object_store"] = partial(store.ping, settings.deidentified_bucket)
    runtime.readiness["work_dir"] = local_disk_check(settings.work_dir)

    def check_keys() -> None:
        keys = load_checked_keys(settings)
        vault.kek = keys.linkage
        handler.pipeline = build_pipeline(settings, keys, store)

    async def prepare() -> None:
        await store.ensure_bucket(settings.deidentified_bucket)
        await records.ensure_indexes()
        await vault.ensure_indexes()

    runtime.preflight(check_keys)
    runtime.on_startup(prepare)
    return runtime.http_app(title="Enclave de-identification")


def run() -> None:
    run_service(create_app, load_settings(DeidSettings))


if __name__ == "__main__":
    run()
