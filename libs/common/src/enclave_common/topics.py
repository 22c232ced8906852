"""Kafka topic names: the one place they are spelled.

Names follow ``enclave.<entity>.<event>.v<major>``; a breaking change to a payload is a new major
topic. Dead-letter topics are ``<topic>.dlq``.
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "enclave"

UPLOAD_CHUNK: Final = "enclave.upload.chunk.v1"
UPLOAD_RECEIVED: Final = "enclave.upload.received.v1"
UPLOAD_COMPLETED: Final = "enclave.upload.completed.v1"
UPLOAD_REJECTED: Final = "enclave.upload.rejected.v1"
INSTANCE_STORED: Final = "enclave.instance.stored.v1"
INSTANCE_REJECTED: Final = "enclave.instance.rejected.v1"
INSTANCE_DEIDENTIFIED: Final = "enclave.instance.deidentified.v1"
INSTANCE_QUARANTINED: Final = "enclave.instance.quarantined.v1"
ANALYSIS_COMPLETED: Final = "enclave.analysis.completed.v1"
ANALYSIS_FAILED: Final = "enclave.analysis.failed.v1"
ACCESS_RECORDED: Final = "enclave.access.recorded.v1"
KEY_CREATED: Final = "enclave.key.created.v1"
KEY_ROTATED: Final = "enclave.key.rotated.v1"
KEY_SHREDDED: Final = "enclave.key.shredded.v1"
SECURITY_ALERT: Final = "enclave.security.alert.v1"

#: Every topic the services publish to (DLQs excluded), e.g. for topic provisioning.
ALL_TOPICS: Final[tuple[str, ...]] = (
    UPLOAD_CHUNK,
    UPLOAD_RECEIVED,
    UPLOAD_COMPLETED,
    UPLOAD_REJECTED,
    INSTANCE_STORED,
    INSTANCE_REJECTED,
    INSTANCE_DEIDENTIFIED,
    INSTANCE_QUARANTINED,
    ANALYSIS_COMPLETED,
    ANALYSIS_FAILED,
    ACCESS_RECORDED,
    KEY_CREATED,
    KEY_ROTATED,
    KEY_SHREDDED,
    SECURITY_ALERT,
)

#: Topics consumed by a service (their DLQs exist too).
CONSUMED_TOPICS: Final[tuple[str, ...]] = (
    UPLOAD_CHUNK,
    UPLOAD_COMPLETED,
    INSTANCE_STORED,
    INSTANCE_DEIDENTIFIED,
    ANALYSIS_COMPLETED,
    ANALYSIS_FAILED,
)

#: The audit service subscribes by this pattern, so a new topic is audited without a code change.
#: The chunk topic carries sealed bulk bytes only; each instance's metadata is audited through
#: ``upload.received`` instead of once per chunk.
AUDITED_PATTERN: Final = r"enclave\.(?!upload\.chunk\.v\d+$).+"


def dlq(topic: str) -> str:
    """Name of the dead-letter topic for ``topic``."""
    return f"{topic}.dlq"


def event_type(topic: str) -> str:
    """The CloudEvents ``type`` for a topic: the topic name without its major version."""
    base = topic.removesuffix(".dlq")
    head, _, major = base.rpartition(".v")
    return head if major.isdigit() else base


def major_version(topic: str) -> int:
    """The payload's major version encoded in the topic name."""
    _, _, major = topic.removesuffix(".dlq").rpartition(".v")
    return int(major)
