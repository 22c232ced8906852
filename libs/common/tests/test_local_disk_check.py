"""The readiness check of a directory a service writes to: present, writable, with room; otherwise
``/readyz`` names what is wrong (the check's exception type, never a path)."""

from __future__ import annotations

from pathlib import Path

import pytest
from enclave_common.service import (
    LocalDirectoryUnusable,
    LocalDiskFull,
    ServiceRuntime,
    local_disk_check,
)
from enclave_common.settings import BaseServiceSettings


async def test_a_writable_directory_with_room_is_ready(tmp_path: Path) -> None:
    await local_disk_check(tmp_path)()
    await local_disk_check(None)()  # the system's temporary directory


async def test_a_missing_directory_is_unusable(tmp_path: Path) -> None:
    with pytest.raises(LocalDirectoryUnusable):
        await local_disk_check(tmp_path / "removed")()


async def test_less_free_space_than_the_minimum_is_full(tmp_path: Path) -> None:
    with pytest.raises(LocalDiskFull):
        await local_disk_check(tmp_path, min_free_bytes=1 << 62)()  # 4 EiB: no disk has that free


async def test_readyz_names_the_failed_check_by_type_only(tmp_path: Path) -> None:
    runtime = ServiceRuntime(BaseServiceSettings(service_name="disk-test"))
    runtime.readiness = {"spool": local_disk_check(tmp_path / "gone-PHI-name")}
    assert await runtime.readiness_report() == {"spool": "unavailable (LocalDirectoryUnusable)"}
