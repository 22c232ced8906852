"""The stored versions of a series' reports, and deleting those a newer result superseded.

An analysis writes its reports at ``reports/<analysis id>/<name>`` in the versioned results bucket:
the same keys again when the same members are analysed again (after ``enclave-deid-redo`` or
``enclave-analysis-rerun``), so older versions, made from copies that may since have been replaced,
would stay readable beside the new ones (``AnalysisService._purge_superseded_reports`` says which
go and when).
"""

from __future__ import annotations

from typing import Any, Protocol

from enclave_common.errors import PermanentError, TransientError
from enclave_common.storage import S3ObjectStore

#: ``DeleteObjects`` takes at most this many keys per request.
DELETE_BATCH = 1000
#: Per-key error codes of ``DeleteObjects`` that say "later", not "never".
TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"})


class ReportVersions(Protocol):
    async def versions(self, bucket: str, prefix: str) -> list[tuple[str, str]]:
        """``(key, version id)`` of every version under ``prefix``."""
        ...

    async def delete(self, bucket: str, versions: list[tuple[str, str]]) -> None:
        """Delete these versions; an error if any one of them could not be deleted."""
        ...


class S3ReportVersions:
    """``ReportVersions`` on the service's object store (``S3ObjectStore``; it has no call that
    deletes given versions, so this one uses its client, with its error classification)."""

    def __init__(self, store: S3ObjectStore) -> None:
        self.store = store

    async def versions(self, bucket: str, prefix: str) -> list[tuple[str, str]]:
        return await self.store.list_versions(bucket, prefix)

    async def delete(self, bucket: str, versions: list[tuple[str, str]]) -> None:
        client = self.store._client

        def delete() -> list[dict[str, Any]]:
            errors: list[dict[str, Any]] = []
            for start in range(0, len(versions), DELETE_BATCH):
                batch = versions[start : start + DELETE_BATCH]
                objects = [{"Key": key, "VersionId": version} for key, version in batch]
                answer = client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
                errors += answer.get("Errors", [])
            return errors

        errors = await self.store._call("delete versions", delete)
        if errors:
            code = str(errors[0].get("Code", "Unknown"))
            if any(str(e.get("Code")) in TRANSIENT_CODES for e in errors):
                raise TransientError(
                    f"object store delete versions failed for {len(errors)} of {len(versions)} versions "
                    f"({code}); tried again",
                    code=f"s3_{code}",
                )
            raise PermanentError(
                f"object store delete versions failed for {len(errors)} of {len(versions)} versions ({code})",
                code=f"s3_{code}",
            )
