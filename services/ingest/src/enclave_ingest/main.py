"""Wiring of the ingest service: the only place that builds clients."""

from __future__ import annotations

from functools import partial

from enclave_common import topics
from enclave_common.crypto import load_private_key
from enclave_common.errors import ConfigurationError
from enclave_common.keys_config import kek_provider
from enclave_common.pseudonyms import pseudonymizer_from_base64
from enclave_common.service import ServiceRuntime, load_settings, local_disk_check, run_service
from enclave_common.storage import S3ObjectStore
from enclave_common.study_key_objects import StudyKeyObjects, shred_listener
from fastapi import FastAPI

from enclave_ingest.catalogue import Catalogue
from enclave_ingest.config import IngestSettings
from enclave_ingest.handlers import ChunkConsumer
from enclave_ingest.pipeline import InstancePipeline
from enclave_ingest.spool import ChunkSpool


def create_app(settings: IngestSettings | None = None) -> FastAPI:
    settings = settings or IngestSettings()
    runtime = ServiceRuntime(settings)
    runtime.publishes(topics.INSTANCE_STORED, topics.INSTANCE_REJECTED, topics.KEY_CREATED)
    # Published by the key command (`enclave-ingest-keys`), run in the service's pod with its Kafka
    # identity: declared here so the AsyncAPI document, and the Kafka ACLs checked against it, list them.
    runtime.publishes(topics.KEY_ROTATED, topics.KEY_SHREDDED)
    store = S3ObjectStore(settings)
    catalogue = Catalogue(runtime.db)
    spool = ChunkSpool(settings.spool_dir)
    consumer = ChunkConsumer(
        runtime,
        catalogue,
        spool,
        abandon_after_s=settings.incomplete_after_s,
        spool_capacity_bytes=settings.spool_capacity_bytes,
    )
    consumer.register()
    runtime.readiness["object_store"] = partial(store.ping, settings.originals_bucket)
    runtime.readiness["spool"] = local_disk_check(settings.spool_dir)

    def load_keys() -> None:
        if settings.private_key_file is None:
            raise ConfigurationError("ENCLAVE_INGEST_PRIVATE_KEY_FILE is not set")
        kek = kek_provider(settings, settings.keyring_file, settings.kms_key_id)
        consumer.pipeline = InstancePipeline(
            spool=spool,
            private_key=load_private_key(str(settings.private_key_file)),
            pseudonymizer=pseudonymizer_from_base64(
                settings.pseudonym_key.get_secret_value() if settings.pseudonym_key else None,
                "ENCLAVE_INGEST_PSEUDONYM_KEY",
            ),
            catalogue=catalogue,
            store=store,
            study_keys=StudyKeyObjects(store, settings.originals_bucket, kek),
            kek=kek,
            bucket=settings.originals_bucket,
            duplicate_policy=settings.duplicate_policy,
            header_prefix_bytes=settings.header_prefix_bytes,
            segment_size=settings.segment_size,
        )

    async def prepare() -> None:
        spool.prepare()
        await store.ensure_bucket(settings.originals_bucket)
        await catalogue.ensure_indexes()

    runtime.consume(
        topics.KEY_SHREDDED,
        shred_listener(lambda: consumer.pipeline.study_keys if consumer.pipeline is not None else None),
    )
    runtime.preflight(load_keys)
    runtime.on_startup(prepare)
    app = runtime.http_app(title="Enclave ingest")
    app.state.catalogue = catalogue
    return app


def run() -> None:
    run_service(create_app, load_settings(IngestSettings))


if __name__ == "__main__":
    run()
