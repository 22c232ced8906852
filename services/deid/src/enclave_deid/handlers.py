"""Thin handler: ``instance.stored`` -> de-identify or quarantine -> ``instance.deidentified|quarantined``;
``key.shredded`` -> erase the shredded study's linkage.

Idempotent on (tenant, instance key): the first delivery claims the instance and records the outcome;
a redelivery, or another upload of the same instance (``duplicate``), re-emits that outcome with an id
derived from its own cause and its own upload ids, and stores nothing new but the upload's ids
(``emitted``, for ``enclave-deid-redo``).
"""

from __future__ import annotations

from typing import Any

import structlog
from enclave_common import topics
from enclave_common.envelope import Envelope, EventData, derived_event_id
from enclave_common.errors import ContractError, TransientError
from enclave_common.events import InstanceDeidentified, InstanceQuarantined, InstanceStored, KeyEvent
from enclave_common.service import ServiceRuntime
from pydantic import ValidationError

from enclave_deid.config import DeidSettings
from enclave_deid.linkage import LinkageVault
from enclave_deid.pipeline import WITHHELD, DeidPipeline, Quarantined, Released, describe_policy
from enclave_deid.records import DeidRecords, InstanceBeingProcessed
from enclave_deid.revision import DEID_REVISION

log = structlog.get_logger("enclave.deid")

SOURCE = "deid"
ACTOR = "service:deid"


def deid_object_key(cause_id: str, instance_key: str) -> str:
    """Opaque key of the de-identified copy; the same for a redelivery of the same cause (no orphan)."""
    return f"deidentified/{derived_event_id(cause_id, 'deid.object', instance_key)}"


class InstanceStoredHandler:
    def __init__(
        self, runtime: ServiceRuntime, settings: DeidSettings, records: DeidRecords, vault: LinkageVault
    ) -> None:
        self.runtime = runtime
        self.settings = settings
        self.records = records
        self.vault = vault
        #: Built at startup, once the keys have been read (no I/O at construction).
        self.pipeline: DeidPipeline | None = None

    def register(self) -> None:
        self.runtime.consume(topics.INSTANCE_STORED, self.on_instance_stored)
        self.runtime.consume(topics.KEY_SHREDDED, self.on_key_shredded)

    async def on_key_shredded(self, envelope: Envelope) -> None:
        """A crypto-shredded study: drop its key from the cache and erase its linkage records.

        The shred made the originals unreadable. The de-identified copies are under the deid KEK and
        stay readable (they hold no identifiers); the linkage records are under the linkage KEK, so
        without this they would still disclose the study's original identifiers through break-glass.
        Idempotent (a redelivery deletes nothing).
        """
        event = envelope.payload(KeyEvent)
        if event.operation != "shredded" or not event.study_key:
            return
        if self.pipeline is not None:
            self.pipeline.study_keys.forget(envelope.tenant, event.study_key)
        erased = await self.vault.erase_study(envelope.tenant, event.study_key)
        log.info("linkage of a crypto-shredded study erased", records=erased)

    async def on_instance_stored(self, envelope: Envelope) -> None:
        try:
            stored: InstanceStored = envelope.payload(InstanceStored)
        except ValidationError:
            raise ContractError("instance.stored payload does not match InstanceStored") from None
        tenant = envelope.tenant
        structlog.contextvars.bind_contextvars(instance_upload_id=stored.instance_upload_id)
        try:
            done = await self.records.claim(tenant, stored.instance_key, stored.sha256, envelope.id)
            if done is not None:
                await self._reemit(done, envelope, stored)
                return
            try:
                await self._process(envelope, stored)
            except TransientError:
                raise  # retried by this delivery, which still holds its claim
            except Exception:
                # Permanent, or unexpected (dead-lettered as well): let a replay from the DLQ claim it.
                await self.records.release(tenant, stored.instance_key, envelope.id)
                raise
        finally:
            structlog.contextvars.unbind_contextvars("instance_upload_id")

    async def _process(self, cause: Envelope, stored: InstanceStored) -> None:
        assert self.pipeline is not None, "the pipeline is built at startup"
        tenant = cause.tenant
        policy = self.settings.policy_for(tenant)
        try:
            outcome: Released | Quarantined = await self.pipeline.run(
                tenant, stored, policy, deid_object_key(cause.id, stored.instance_key)
            )
        except WITHHELD as exc:
            # The instance itself cannot be de-identified: held back with the reason, so its status
            # and its series come to an end (dead-lettered, it would stay "stored" for good).
            log.warning("instance cannot be de-identified; quarantined", reason_code=exc.code)
            outcome = Quarantined(exc.reason, code=exc.code)
        self.runtime.count_crypto("decrypt")  # the original
        if isinstance(outcome, Quarantined):
            data: EventData = InstanceQuarantined(
                upload_id=stored.upload_id,
                instance_upload_id=stored.instance_upload_id,
                study_key=stored.study_key,
                series_key=stored.series_key,
                reason_code=outcome.code,
                reason=outcome.reason,
            )
            topic, status = topics.INSTANCE_QUARANTINED, "quarantined"
            extra: dict[str, Any] = {"study_key": stored.study_key}
        else:
            self.runtime.count_crypto("encrypt")  # the de-identified copy
            profile, options = describe_policy(policy)
            data = InstanceDeidentified(
                upload_id=stored.upload_id,
                instance_upload_id=stored.instance_upload_id,
                patient_pseudonym=outcome.patient_pseudonym,
                patient_key=stored.patient_key,
                study_key=stored.study_key,
                series_key=stored.series_key,
                instance_key=stored.instance_key,
                deid_study_uid=outcome.deid_study_uid,
                deid_series_uid=outcome.deid_series_uid,
                deid_instance_uid=outcome.deid_instance_uid,
                object=outcome.object,
                profile=profile,
                options=options,
            )
            await self.vault.store(
                outcome.linkage, stored.instance_key, stored.study_key, patient_key=stored.patient_key
            )
            topic, status = topics.INSTANCE_DEIDENTIFIED, "deidentified"
            extra = {
                "study_key": stored.study_key,
                "patient_pseudonym": outcome.patient_pseudonym,
                "object": outcome.object.model_dump(),
                "kek_id": outcome.kek_id,
                "size": outcome.size,
            }
        # What a later ``enclave-deid-redo`` needs: the rules' revision, the original, every upload.
        extra |= {
            "revision": DEID_REVISION,
            "original": stored.object.model_dump(),
            "source_size": stored.size,
            "emitted": [{"upload_id": stored.upload_id, "instance_upload_id": stored.instance_upload_id}],
        }
        envelope = self._envelope(topic, data, cause, stored)
        await self.records.finish(
            tenant, stored.instance_key, status=status, topic=topic, envelope=envelope, extra=extra
        )
        await self.runtime.publisher.publish(topic, envelope, key=stored.series_key)
        log.info("instance " + status, topic=topic, reason_code=getattr(data, "reason_code", None))

    async def _reemit(self, done: dict[str, Any], cause: Envelope, stored: InstanceStored) -> None:
        """Publish the recorded outcome again, for this delivery's upload ids, with an id derived from it.

        The upload is noted in the record first (``emitted``): ``enclave-deid-redo`` publishes a new
        copy for every upload that was told of the old one. If a redo replaced the outcome meanwhile,
        before the note or before the publication, this delivery waits and re-emits the new one (so
        the last event of each upload names the current copy)."""
        outcome = done["outcome"]
        topic: str = outcome["topic"]
        if not await self.records.note_emitted(
            cause.tenant,
            stored.instance_key,
            outcome["event_id"],
            stored.upload_id,
            stored.instance_upload_id,
        ):
            raise InstanceBeingProcessed("the instance's outcome was replaced while re-emitting it; retrying")
        fields = {
            **outcome["data"],
            "upload_id": stored.upload_id,
            "instance_upload_id": stored.instance_upload_id,
        }
        model = InstanceDeidentified if topic == topics.INSTANCE_DEIDENTIFIED else InstanceQuarantined
        # An outcome a redo recorded gets ids of its own (a redelivery of the old one is not a duplicate).
        discriminator = stored.instance_upload_id + (
            f"|{outcome['event_id']}" if done.get("redone_at") else ""
        )
        envelope = self._envelope(topic, model.model_validate(fields), cause, stored, discriminator)
        await self.runtime.publisher.publish(topic, envelope, key=stored.series_key)
        if await self.records.outcome_event_id(cause.tenant, stored.instance_key) != outcome["event_id"]:
            raise InstanceBeingProcessed("the instance's outcome was replaced while re-emitting it; retrying")
        log.info(
            "outcome re-emitted for an instance already handled", topic=topic, duplicate=stored.duplicate
        )

    @staticmethod
    def _envelope(
        topic: str, data: EventData, cause: Envelope, stored: InstanceStored, discriminator: str | None = None
    ) -> Envelope:
        return Envelope.for_topic(
            topic,
            data,
            source=SOURCE,
            tenant=cause.tenant,
            actor=ACTOR,
            correlation_id=cause.correlation_id,
            cause=cause,
            discriminator=discriminator or stored.instance_upload_id,
        )
