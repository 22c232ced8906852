"""The stored versions of a series' reports, and deleting those a newer result superseded.

An analysis writes its reports at ``reports/<analysis id>/<name>`` in the versioned results bucket:
the same keys again when the same members are analysed again (after ``enclave-deid-redo`` or
``enclave-analysis-rerun``), so older versions, made from copies that may since have been replaced,
would stay readable beside the new ones (``AnalysisService._purge_superseded_reports`` says which
go and when).
"""

from __future__ import annotations

from typing import Protocol

from enclave_common.storage import S3ObjectStore


class ReportVersions(Protocol):
    async def versions(self, bucket: str, prefix: str) -> list[tuple[str, str]]:
        """``(key, version id)`` of every version under ``prefix``."""
        ...

    async def delete(self, bucket: str, versions: list[tuple[str, str]]) -> None:
        """Delete these versions; an error if any one of them could not be deleted."""
        ...


class S3ReportVersions:
    """``ReportVersions`` on the service's object store (``S3ObjectStore``)."""

    def __init__(self, store: S3ObjectStore) -> None:
        self.store = store

    async def versions(self, bucket: str, prefix: str) -> list[tuple[str, str]]:
        return await self.store.list_versions(bucket, prefix)

    async def delete(self, bucket: str, versions: list[tuple[str, str]]) -> None:
        await self.store.delete_versions(bucket, versions)
