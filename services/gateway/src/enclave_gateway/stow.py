"""The STOW-RS response: the Store Instances Response Module (PS3.18 Annex I) as ``application/dicom+json``.

The body is built as a pydicom :class:`~pydicom.dataset.Dataset` and serialised with pydicom's
DICOM JSON model (PS3.18 Annex F), so the encoding is the library's, not ours. The status rule is
PS3.18 Table 10.5.3-1: 200 when every instance was stored without warning, 202 when some were stored
but warnings or failures exist, 409 when none was stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from enclave_gateway.multipart import RequestBodyError
from enclave_gateway.validation import FailureReason, InstanceInfo, ValidationFailure, WarningReason

DICOM_JSON_MEDIA_TYPE = "application/dicom+json"
#: What a STOW-RS response can be sent as: PS3.18's JSON, also under its generic name. The XML
#: response (application/dicom+xml) is not offered.
STOW_RESPONSE_TYPES = (DICOM_JSON_MEDIA_TYPE, "application/json")


def negotiate(accept: str | None, offered: Sequence[str]) -> str | None:
    """The media type of ``offered`` to answer with under an ``Accept`` header (RFC 9110 12.5.1), or
    None when it admits none: each offered type takes the ``q`` of the most specific range that
    matches it (exact, then ``type/*``, then ``*/*``), ``q=0`` declines it, and the highest ``q``
    wins (ties: the first offered). No header admits the first. Hand-written: neither Starlette nor
    FastAPI negotiates content, and this is the whole of what STOW needs."""
    if accept is None or not accept.strip():
        return offered[0]
    ranges: dict[str, float] = {}
    for media_range in accept.split(","):
        name, *params = (piece.strip().lower() for piece in media_range.split(";"))
        if not name:
            continue
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip() == "q":
                weight = _weight(value)
        ranges[name] = max(weight, ranges.get(name, 0.0))
    best, best_weight = None, 0.0
    for media in offered:
        kind = media.split("/", 1)[0]
        for candidate in (media, f"{kind}/*", "*/*", "*"):
            if candidate in ranges:
                if ranges[candidate] > best_weight:
                    best, best_weight = media, ranges[candidate]
                break
    return best


def _weight(text: str) -> float:
    """A media range's ``q``, within 0 to 1; one that is not a finite number counts as 1 (the range is
    not refused)."""
    try:
        weight = float(text.strip())
    except ValueError:
        return 1.0
    return min(max(weight, 0.0), 1.0) if math.isfinite(weight) else 1.0


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """An instance the gateway accepted (its hand-off acknowledged), for ReferencedSOPSequence."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    warning_reason: WarningReason | None = None

    @classmethod
    def from_info(cls, info: InstanceInfo, warning_reason: WarningReason | None = None) -> StoredInstance:
        return cls(
            info.sop_class_uid,
            info.sop_instance_uid,
            info.study_instance_uid,
            info.series_instance_uid,
            warning_reason,
        )


@dataclass(frozen=True, slots=True)
class FailedInstance:
    """An instance the gateway refused; UIDs are None when its header could not be read."""

    reason: FailureReason
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None

    @classmethod
    def from_failure(cls, failure: ValidationFailure) -> FailedInstance:
        return cls(failure.reason_code, failure.sop_class_uid, failure.sop_instance_uid)


def stow_status(stored: Sequence[StoredInstance], failed: Sequence[FailedInstance]) -> int:
    """HTTP status for a request whose body was read completely (PS3.18 Table 10.5.3-1)."""
    if not stored:
        return 409
    if failed or any(instance.warning_reason is not None for instance in stored):
        return 202
    return 200


def _instance_url(base_url: str, instance: StoredInstance) -> str:
    return (
        f"{base_url}/studies/{instance.study_instance_uid}/series/{instance.series_instance_uid}"
        f"/instances/{instance.sop_instance_uid}"
    )


def build_stow_response(
    base_url: str,
    stored: Sequence[StoredInstance],
    failed: Sequence[FailedInstance],
    study_instance_uid: str | None = None,
) -> dict[str, Any]:
    """The Store Instances Response Module as a DICOM JSON object.

    ``base_url`` is the DICOMweb root (e.g. ``https://host/dicomweb``). ``study_instance_uid`` is the
    study of the request URL, if any; otherwise the study-level RetrieveURL is given only when every
    stored instance belongs to one study (it is Type 2, so it is present and empty otherwise).
    """
    base = base_url.rstrip("/")
    response = Dataset()
    studies = {instance.study_instance_uid for instance in stored}
    study = study_instance_uid or (next(iter(studies)) if len(studies) == 1 else None)
    response.RetrieveURL = f"{base}/studies/{study}" if study and stored else None
    if failed:
        response.FailedSOPSequence = [_failed_item(instance) for instance in failed]
    if stored:
        response.ReferencedSOPSequence = [_referenced_item(base, instance) for instance in stored]
    return response.to_json_dict()


def _referenced_item(base: str, instance: StoredInstance) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = instance.sop_class_uid
    item.ReferencedSOPInstanceUID = instance.sop_instance_uid
    item.RetrieveURL = _instance_url(base, instance)
    if instance.warning_reason is not None:
        item.WarningReason = int(instance.warning_reason)
    return item


def _failed_item(instance: FailedInstance) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = instance.sop_class_uid or None
    item.ReferencedSOPInstanceUID = instance.sop_instance_uid or None
    item.FailureReason = int(instance.reason)
    return item


def error_body(status: int, code: str, message: str, **fields: Any) -> dict[str, Any]:
    """The gateway's error shape: the HTTP status, a code to branch on, what was wrong, and what the
    error adds (``problems`` of a 422)."""
    return {"status": status, "error": code, "message": message, **fields}


def request_error_body(error: RequestBodyError) -> dict[str, Any]:
    """JSON body for a request-level 400/413/415: what was wrong and what is allowed."""
    return error_body(error.status_code, error.code, str(error))
