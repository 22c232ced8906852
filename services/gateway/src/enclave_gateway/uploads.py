"""One upload request, from streamed body to acknowledged hand-off.

The body streams through the multipart parser; each part is validated and sealed as it arrives.
Nothing is published until the whole body was read and accepted at the request level, so a request
that fails half-way (bad boundary, limit exceeded, client gone) leaves nothing behind. Then every
accepted instance is published (all chunks acknowledged), followed by ``upload.completed``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from enclave_common import topics
from enclave_common.crypto import Pseudonymizer
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.errors import TransientError, unavailable_dependency
from enclave_common.events import UploadCompleted
from enclave_common.pseudonyms import InstanceKeys, instance_keys

from enclave_gateway.admission import DEFAULT_MAX_CONCURRENT_UPLOADS, UploadSlots
from enclave_gateway.handoff import (
    DEFAULT_SPOOL_MEMORY_TOTAL_BYTES,
    Handoff,
    SealedInstance,
    SpoolBudget,
    SpoolDiskBudget,
    SpoolMemoryBudget,
)
from enclave_gateway.multipart import (
    DICOM_MEDIA_TYPE,
    BodyLimits,
    MalformedMultipartError,
    NoFileFieldError,
    PartData,
    PartEnd,
    PartStart,
    RequestBodyError,
    parse_body_format,
    parser_for,
)
from enclave_gateway.readmodel import ReadModel
from enclave_gateway.validation import (
    FailureReason,
    InstanceInfo,
    InstanceInspector,
    ValidationFailure,
    ValidationPolicy,
)


def keys_for(pseudonymizer: Pseudonymizer, tenant: str, info: InstanceInfo) -> InstanceKeys:
    """The pseudonymous keys an accepted instance travels under (its identifiers never leave here)."""
    return instance_keys(
        pseudonymizer,
        tenant,
        patient_id=info.patient_id,
        study_uid=info.study_instance_uid,
        series_uid=info.series_instance_uid,
        sop_instance_uid=info.sop_instance_uid,
    )


class BodyTimeout(MalformedMultipartError):
    code = "body_timeout"
    status_code = 408


class BodyTooSlow(BodyTimeout):
    code = "body_too_slow"


class ClientClosedRequest(RequestBodyError):
    """The client closed the connection before its body ended (a PACS that timed out, a user who
    cancelled): nginx's 499 "client closed request". The client's fault or choice, not the
    gateway's, so it is counted and logged as 499, not as a 500; nothing of the request is kept."""

    code = "client_closed_request"
    status_code = 499


@dataclass(frozen=True)
class BodyPace:
    """How a request body must keep arriving: never silent for ``idle_timeout_s``, and after
    ``grace_s`` at ``min_rate_bytes_per_s`` on average since the request started."""

    idle_timeout_s: float
    min_rate_bytes_per_s: int = 1024
    grace_s: float = 30.0


@dataclass
class AcceptedPart:
    index: int
    info: InstanceInfo
    sealed: SealedInstance
    filename: str | None = None


@dataclass
class FailedPart:
    index: int
    failure: ValidationFailure
    filename: str | None = None


@dataclass
class UploadResult:
    upload_id: str
    budget: SpoolBudget
    accepted: list[AcceptedPart] = field(default_factory=list)
    failed: list[FailedPart] = field(default_factory=list)
    #: Accepted instances whose every chunk and ``upload.received`` were queued to Kafka by
    #: :meth:`UploadProcessor.publish` (acknowledged or not): once one is, a failure of the
    #: hand-off no longer means that nothing of the upload was handed off.
    handed_off: int = 0


@dataclass
class _Current:
    index: int
    inspector: InstanceInspector | None
    sealed: SealedInstance | None
    filename: str | None
    refused: ValidationFailure | None = None


class UploadProcessor:
    def __init__(
        self,
        *,
        recipient: X25519PublicKey,
        pseudonymizer: Pseudonymizer,
        handoff: Handoff,
        read_model: ReadModel,
        limits: BodyLimits,
        policy: ValidationPolicy,
        spool_dir: Path,
        chunk_bytes: int,
        pace: BodyPace,
        spool_memory_bytes: int,
        spool_disk_bytes: int | None = None,
        spool_memory_total_bytes: int = DEFAULT_SPOOL_MEMORY_TOTAL_BYTES,
        max_concurrent_uploads: int = DEFAULT_MAX_CONCURRENT_UPLOADS,
    ) -> None:
        self.recipient = recipient
        self.pseudonymizer = pseudonymizer
        self.handoff = handoff
        self.read_model = read_model
        self.limits = limits
        self.policy = policy
        self.spool_dir = spool_dir
        self.spool_memory_bytes = spool_memory_bytes
        #: Shared by every request of the process: what their sealed instances hold in memory.
        self.spool_memory = SpoolMemoryBudget(spool_memory_total_bytes)
        self.spool_disk = SpoolDiskBudget(spool_disk_bytes)
        #: The upload routes hold one of these while they receive and hand off a request.
        self.slots = UploadSlots(max_concurrent_uploads)
        self.chunk_bytes = chunk_bytes
        self.pace = pace

    async def receive(
        self,
        content_type: str | None,
        body: AsyncIterator[bytes],
        *,
        tenant: str,
        expected_study_uid: str | None = None,
        form_fields: frozenset[str] | None = None,
    ) -> UploadResult:
        """Read and validate the whole body; RequestBodyError (nothing kept) on a request-level error."""
        parser = parser_for(parse_body_format(content_type), self.limits)
        result = UploadResult(
            upload_id=new_event_id(), budget=SpoolBudget(self.spool_memory_bytes, self.spool_memory)
        )
        current: _Current | None = None
        try:
            async for chunk in _paced(body, self.pace):
                for event in parser.feed(chunk):
                    current = self._on_event(event, current, result, tenant, expected_study_uid, form_fields)
            for event in parser.close():
                current = self._on_event(event, current, result, tenant, expected_study_uid, form_fields)
            if form_fields is not None and not result.accepted and not result.failed:
                raise NoFileFieldError(
                    "The form has no file part; send DICOM files in a form field named "
                    + " or ".join(f"'{name}'" for name in sorted(form_fields))
                )
        except BaseException:
            if current is not None and current.sealed is not None:
                current.sealed.discard()
            self.discard(result)
            raise
        return result

    def _on_event(
        self,
        event: PartStart | PartData | PartEnd,
        current: _Current | None,
        result: UploadResult,
        tenant: str,
        expected_study_uid: str | None,
        form_fields: frozenset[str] | None,
    ) -> _Current | None:
        if isinstance(event, PartStart):
            headers = event.headers
            refused = None
            if (
                form_fields is not None
                and headers.form_field is not None
                and headers.form_field not in form_fields
            ):
                return _Current(
                    event.index, None, None, headers.filename, refused=None
                )  # other form field: ignored
            media = headers.media_type
            if media not in (DICOM_MEDIA_TYPE, "application/octet-stream"):
                refused = ValidationFailure(
                    FailureReason.CANNOT_UNDERSTAND,
                    f"Part content type {media[:60]} is not accepted; accepted: application/dicom",
                    "part_media_type",
                )
                return _Current(event.index, None, None, headers.filename, refused)
            return _Current(
                event.index,
                InstanceInspector(self.policy, expected_study_uid),
                SealedInstance(
                    self.recipient, tenant, self.spool_dir, self.chunk_bytes, result.budget, self.spool_disk
                ),
                headers.filename,
            )
        assert current is not None
        if isinstance(event, PartData):
            if current.inspector is None:
                return current
            failure = current.inspector.feed(event.data)
            if failure is None and current.sealed is not None:
                current.sealed.feed(event.data)
            elif current.sealed is not None:
                current.sealed.discard()
                current.sealed = None
            return current
        # PartEnd
        if current.refused is not None:
            result.failed.append(FailedPart(current.index, current.refused, current.filename))
        elif current.inspector is not None:
            verdict = current.inspector.finish()
            if isinstance(verdict, InstanceInfo) and current.sealed is not None:
                current.sealed.finish()
                result.accepted.append(AcceptedPart(current.index, verdict, current.sealed, current.filename))
            else:
                if current.sealed is not None:
                    current.sealed.discard()
                assert isinstance(verdict, ValidationFailure)
                result.failed.append(FailedPart(current.index, verdict, current.filename))
        return None

    async def publish(self, result: UploadResult, *, tenant: str, actor: str) -> None:
        """Hand every accepted instance to Kafka, then ``upload.completed``.

        Every chunk and ``upload.received`` is queued at once and acknowledged together; the
        read-model records are written meanwhile. Only then is ``upload.completed`` published: it
        tells analysis which instances make up the upload, so it never names an instance whose
        hand-off was not acknowledged.
        """
        try:
            keyed = [(part, keys_for(self.pseudonymizer, tenant, part.info)) for part in result.accepted]
            # The read-model write overlaps the Kafka round trips (it is not what acknowledges the
            # instance; if publishing fails, the client never learns these imaging ids).
            recorded = asyncio.ensure_future(
                self.read_model.record_uploads(
                    tenant,
                    result.upload_id,
                    [(part.sealed.instance_upload_id, keys, part.info.sop_class_uid) for part, keys in keyed],
                )
            )
            try:
                acks = self.handoff.acknowledgements()
                for part, keys in keyed:
                    await self.handoff.publish_instance(
                        acks,
                        part.sealed,
                        upload_id=result.upload_id,
                        actor=actor,
                        sha256=part.info.sha256,
                        keys=keys,
                        sop_class_uid=part.info.sop_class_uid,
                        transfer_syntax_uid=part.info.transfer_syntax_uid,
                    )
                    result.handed_off += 1
                await acks.settle()
            finally:
                if not recorded.done():
                    await asyncio.wait([recorded])
            _recorded(recorded)
            series = list(dict.fromkeys(keys.series_key for _, keys in keyed))
            completed = Envelope.for_topic(
                topics.UPLOAD_COMPLETED,
                UploadCompleted(
                    upload_id=result.upload_id,
                    instance_upload_ids=[p.sealed.instance_upload_id for p in result.accepted],
                    series_keys=series,
                    accepted=len(result.accepted),
                    rejected=len(result.failed),
                ),
                source="gateway",
                tenant=tenant,
                actor=actor,
                correlation_id=result.upload_id,
            )
            await self.handoff.publish_event(topics.UPLOAD_COMPLETED, completed, result.upload_id)
        finally:
            self.discard(result)

    @staticmethod
    def discard(result: UploadResult) -> None:
        for part in result.accepted:
            part.sealed.discard()


class UploadNotRecorded(TransientError):
    """The read model did not record an upload's instances (its database did not answer): the
    request answers 503 like a Kafka outage. Their hand-off may have been acknowledged already, so
    the answer says what a retry does."""

    code = "database_unavailable"


def _recorded(write: asyncio.Future[None]) -> None:
    """The read-model write's outcome; a database outage becomes :class:`UploadNotRecorded`."""
    try:
        write.result()
    except Exception as exc:
        if unavailable_dependency(exc) is None:
            raise
        raise UploadNotRecorded(
            "The gateway's database did not record the upload, so nothing is acknowledged; retry "
            "later. An instance sent again is recognised by ingest as a duplicate and stored once"
        ) from exc


async def _paced(body: AsyncIterator[bytes], pace: BodyPace) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    received = 0
    iterator = body.__aiter__()
    while True:
        try:
            async with asyncio.timeout(pace.idle_timeout_s):  # per chunk: no task, unlike wait_for
                chunk = await iterator.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise BodyTimeout(
                f"the request body sent nothing for {pace.idle_timeout_s:g} s; bodies must keep streaming"
            ) from None
        received += len(chunk)
        elapsed = loop.time() - started
        if elapsed > pace.grace_s and received < pace.min_rate_bytes_per_s * elapsed:
            raise BodyTooSlow(
                f"the request body arrived at {received / elapsed:.0f} bytes/s on average; after the "
                f"first {pace.grace_s:g} s at least {pace.min_rate_bytes_per_s} bytes/s is required"
            )
        if chunk:
            yield chunk
