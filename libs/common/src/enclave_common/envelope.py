"""The event envelope every Kafka message carries (CloudEvents vocabulary).

Envelopes are frozen and tolerant of unknown fields, so a newer producer can add fields without
breaking an older consumer. Events carry no PHI: only opaque ids and keyed-HMAC pseudonyms.
"""

from __future__ import annotations

import builtins
import hashlib
import re
import uuid
from datetime import UTC, datetime
from typing import Any, Self, TypeVar

import uuid_utils
from pydantic import BaseModel, ConfigDict, Field

from enclave_common import topics

SCHEMA_VERSION = "1.0"


def new_event_id() -> str:
    """A fresh UUIDv7 (time-ordered, so ids sort by creation time)."""
    return str(uuid_utils.uuid7())


#: A request id a client may give (``X-Request-ID``): a UUID in any case, or 32 hex digits (nginx's
#: ``$request_id``).
_REQUEST_ID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32}"
)


def canonical_request_id(given: str | None) -> str | None:
    """``given`` as a lowercase dashed UUID when it is a UUID (any case) or 32 hex digits, else None:
    free text from a client is never recorded (it could carry PHI). The form every service records a
    client's request id in, and the form an auditor's ``correlation_id`` filter is read in."""
    if given is None or not _REQUEST_ID.fullmatch(given.strip()):
        return None
    return str(uuid.UUID(hex=given.strip()))


def derived_event_id(causation_id: str, event_type: str, discriminator: str = "") -> str:
    """A UUIDv7-layout id that is the same every time the same cause produces the same event.

    A consumer that crashes after publishing and before committing re-publishes on redelivery;
    deriving the id from the cause makes that re-publication carry the same id, so every
    downstream consumer (and the audit trail) sees one event, not two. The 48-bit timestamp is
    taken from the causing UUIDv7 so ids still sort by time.
    """
    cause = uuid.UUID(causation_id)
    digest = hashlib.sha256(f"{causation_id}|{event_type}|{discriminator}".encode()).digest()
    raw = bytearray(cause.bytes[:6] + digest[:10])
    raw[6] = 0x70 | (raw[6] & 0x0F)  # version 7
    raw[8] = 0x80 | (raw[8] & 0x3F)  # RFC 4122 variant
    return str(uuid.UUID(bytes=bytes(raw)))


class EventData(BaseModel):
    """Base for event payloads: frozen, unknown fields kept (forward compatible)."""

    model_config = ConfigDict(frozen=True, extra="allow")


_DataT = TypeVar("_DataT", bound=EventData)


class Envelope(BaseModel):
    """CloudEvents-style envelope: who said what, when, caused by what, for which upload."""

    model_config = ConfigDict(frozen=True, extra="allow")

    id: str = Field(default_factory=new_event_id)
    type: str
    source: str
    time: datetime = Field(default_factory=lambda: datetime.now(UTC))
    schema_version: str = SCHEMA_VERSION
    correlation_id: str
    causation_id: str | None = None
    tenant: str
    actor: str
    data: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def for_topic(
        cls,
        topic: str,
        data: EventData,
        *,
        source: str,
        tenant: str,
        actor: str,
        correlation_id: str,
        cause: Envelope | None = None,
        discriminator: str | None = None,
    ) -> Self:
        """Build the envelope for ``data`` published to ``topic``.

        With a ``cause`` and a ``discriminator``, the id is derived (see :func:`derived_event_id`)
        so that retries of the same handler produce the same event.
        """
        kind = topics.event_type(topic)
        event_id = (
            derived_event_id(cause.id, kind, discriminator)
            if cause is not None and discriminator is not None
            else new_event_id()
        )
        return cls(
            id=event_id,
            type=kind,
            source=source,
            tenant=tenant,
            actor=actor,
            correlation_id=correlation_id,
            causation_id=cause.id if cause is not None else None,
            data=data.model_dump(mode="json"),
        )

    def payload(self, model: builtins.type[_DataT]) -> _DataT:
        """The ``data`` parsed as ``model`` (raises pydantic's ValidationError if it does not fit)."""
        return model.model_validate(self.data)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        return cls.model_validate_json(raw)
