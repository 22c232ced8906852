"""The sealed hand-off: each accepted instance is sealed to the ingest public key while it streams,
spooled as ciphertext, and published as chunks of at most 1 MiB only when the whole request is valid.

The gateway holds no key that can open what it sealed. Publishing waits for Kafka's acknowledgement
of every chunk (acks=all, idempotent producer); any failure is reported as ``KafkaUnavailable`` so
the request answers 503 and acknowledges nothing.
"""

from __future__ import annotations

import asyncio
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from enclave_common import topics
from enclave_common.crypto import InstanceSealer, SealContext
from enclave_common.envelope import Envelope, new_event_id
from enclave_common.errors import TransientError
from enclave_common.events import UploadChunk, UploadReceived
from enclave_common.kafka import EventPublisher
from enclave_common.pseudonyms import InstanceKeys

_LEN = struct.Struct(">I")
#: Chunks published concurrently per instance (bounded memory: ~window x 1.4 MiB of envelopes).
PUBLISH_WINDOW = 8


class KafkaUnavailable(TransientError):
    code = "kafka_unavailable"


class SealedInstance:
    """One part being sealed as it streams; plaintext is buffered at most one chunk at a time."""

    def __init__(self, recipient: X25519PublicKey, tenant: str, spool_dir: Path, chunk_bytes: int) -> None:
        self.tenant = tenant
        self.instance_upload_id = new_event_id()
        self._sealer = InstanceSealer(
            recipient, SealContext(tenant, self.instance_upload_id), max_chunk_bytes=chunk_bytes
        )
        self._chunk_bytes = chunk_bytes
        self._buffer = bytearray()
        fd, name = tempfile.mkstemp(prefix="sealed-", dir=spool_dir)
        self._path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self.count = 0
        self.size = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        while len(self._buffer) > self._chunk_bytes:
            self._write(self._sealer.seal_chunk(memoryview(self._buffer)[: self._chunk_bytes], final=False))
            del self._buffer[: self._chunk_bytes]

    def finish(self) -> None:
        self._write(self._sealer.seal_chunk(bytes(self._buffer), final=True))
        self._buffer.clear()
        self._file.close()

    def _write(self, sealed: bytes | bytearray) -> None:
        self._file.write(_LEN.pack(len(sealed)))
        self._file.write(sealed)
        self.count += 1

    def chunks(self) -> Iterator[bytes]:
        with self._path.open("rb") as spool:
            while header := spool.read(_LEN.size):
                yield spool.read(_LEN.unpack(header)[0])

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._path.unlink(missing_ok=True)


class Handoff:
    """Publishes sealed instances and the upload events."""

    def __init__(self, publisher: EventPublisher, timeout_s: float) -> None:
        self._publisher = publisher
        self._timeout = timeout_s

    async def _publish(self, topic: str, envelope: Envelope, key: str) -> None:
        try:
            await asyncio.wait_for(self._publisher.publish(topic, envelope, key=key), self._timeout)
        except (TimeoutError, ConnectionError, OSError) as exc:
            raise KafkaUnavailable(
                "Kafka did not acknowledge the upload; nothing was accepted, retry later"
            ) from exc
        except Exception as exc:
            if type(exc).__module__.startswith(("aiokafka", "kafka", "faststream")):
                raise KafkaUnavailable(
                    "Kafka did not acknowledge the upload; nothing was accepted, retry later"
                ) from exc
            raise

    async def publish_instance(
        self,
        sealed: SealedInstance,
        *,
        upload_id: str,
        actor: str,
        sha256: str,
        keys: InstanceKeys,
        sop_class_uid: str,
        transfer_syntax_uid: str,
    ) -> None:
        """Publish every chunk (acknowledged), then ``upload.received``."""
        window: list[Envelope] = []
        for index, piece in enumerate(sealed.chunks()):
            window.append(
                Envelope.for_topic(
                    topics.UPLOAD_CHUNK,
                    UploadChunk(
                        upload_id=upload_id,
                        instance_upload_id=sealed.instance_upload_id,
                        index=index,
                        count=sealed.count,
                        sealed=piece,
                        total_size=sealed.size,
                        sha256=sha256,
                    ),
                    source="gateway",
                    tenant=sealed.tenant,
                    actor=actor,
                    correlation_id=upload_id,
                )
            )
            if len(window) >= PUBLISH_WINDOW:
                await self._flush(window, sealed.instance_upload_id)
        await self._flush(window, sealed.instance_upload_id)
        received = Envelope.for_topic(
            topics.UPLOAD_RECEIVED,
            UploadReceived(
                upload_id=upload_id,
                instance_upload_id=sealed.instance_upload_id,
                patient_key=keys.patient_key,
                study_key=keys.study_key,
                series_key=keys.series_key,
                instance_key=keys.instance_key,
                sop_class_uid=sop_class_uid,
                transfer_syntax_uid=transfer_syntax_uid,
                size=sealed.size,
                sha256=sha256,
                chunk_count=sealed.count,
            ),
            source="gateway",
            tenant=sealed.tenant,
            actor=actor,
            correlation_id=upload_id,
        )
        await self._publish(topics.UPLOAD_RECEIVED, received, sealed.instance_upload_id)

    async def _flush(self, window: list[Envelope], key: str) -> None:
        if window:
            await asyncio.gather(*(self._publish(topics.UPLOAD_CHUNK, env, key) for env in window))
            window.clear()

    async def publish_event(self, topic: str, envelope: Envelope, key: str) -> None:
        await self._publish(topic, envelope, key)
