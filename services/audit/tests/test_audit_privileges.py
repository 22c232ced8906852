"""The audit service's MongoDB roles: the documented script is the one the code generates, and
under the append-only role the service checks its indexes instead of creating them. (That every
command the code sends is within the role is checked on the real server:
tests/integration/test_audit_privileges.py.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from enclave_audit import migrate
from enclave_audit.main import prepare_indexes
from enclave_audit.privileges import MIGRATION_PRIVILEGES, SERVICE_PRIVILEGES, allows, role_script
from enclave_audit.store import INDEXES
from enclave_common.errors import ConfigurationError

DOCS = Path(__file__).resolve().parents[3] / "docs" / "audit.md"


class FakeStore:
    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        self.created = False

    async def ensure_indexes(self) -> None:
        self.created = True

    async def missing_indexes(self) -> list[str]:
        return self.missing


def test_the_documented_role_script_is_the_generated_one():
    block = re.search(r"```javascript\n(.*?)```", DOCS.read_text(), re.S)
    assert block is not None
    assert block.group(1) == role_script("audit")


def test_print_roles_prints_the_script_for_the_configured_database(capsys, monkeypatch):
    monkeypatch.setenv("ENCLAVE_AUDIT_SERVICE_NAME", "audit_eu")
    assert migrate.main(["--print-roles"]) == 0
    out = capsys.readouterr().out
    assert out == role_script("audit_eu")
    assert '{ db: "audit_eu", collection: "records" }, actions: ["find", "insert"]' in out


def test_the_service_role_cannot_change_or_remove_the_trail_nor_create_indexes():
    for collection in ("records", "checkpoints", "alerts"):
        for action in ("update", "remove", "createIndex", "dropCollection", "dropIndex"):
            assert not allows(SERVICE_PRIVILEGES, action, collection), (action, collection)
        assert allows(SERVICE_PRIVILEGES, "insert", collection)
    assert allows(SERVICE_PRIVILEGES, "update", "anomaly_windows")
    assert allows(SERVICE_PRIVILEGES, "listIndexes", "records")
    for collection, *_ in INDEXES:
        assert allows(MIGRATION_PRIVILEGES, "createIndex", collection)
        assert not allows(MIGRATION_PRIVILEGES, "insert", collection)


async def test_without_index_creation_missing_indexes_stop_the_start_by_name():
    store: Any = FakeStore(["records.sequence_unique", "alerts.rule_1_subject_1_at_-1"])
    with pytest.raises(ConfigurationError) as refused:
        await prepare_indexes(store, create=False)
    assert "records.sequence_unique, alerts.rule_1_subject_1_at_-1" in str(refused.value)
    assert "enclave-audit-migrate" in str(refused.value)
    assert store.created is False


async def test_with_every_index_present_nothing_is_created_and_the_start_goes_on():
    store: Any = FakeStore([])
    await prepare_indexes(store, create=False)
    assert store.created is False
    await prepare_indexes(store, create=True)
    assert store.created is True
