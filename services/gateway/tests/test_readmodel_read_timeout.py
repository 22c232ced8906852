"""Each database read of the status, results and patient routes runs under the gateway's read time
limit (``ENCLAVE_GATEWAY_READ_TIMEOUT_S``): pymongo's client-side operation timeout, which bounds
server selection and the reply and sends the server ``maxTimeMS``. Before, a database that stopped
answering held a read for pymongo's monitor cycle, about 30 s. What the route answers past it (503
``dependency_unavailable``) is the common handling of a database that did not answer; the bound
itself is tried on FerretDB in tests/integration/test_dependency_outage.py."""

from __future__ import annotations

from typing import Any

import pytest
from enclave_gateway.config import GatewaySettings
from enclave_gateway.readmodel import ReadModel
from pydantic import ValidationError
from pymongo import _csot


class Recording:
    """A collection that notes the operation timeout in force when each read is made."""

    def __init__(self, seen: list[float | None]) -> None:
        self.seen = seen

    async def find_one(self, query: dict[str, Any]) -> None:
        self.seen.append(_csot.get_timeout())

    def find(self, query: dict[str, Any], projection: dict[str, Any] | None = None) -> Recording:
        self.seen.append(_csot.get_timeout())
        return self

    def sort(self, *_: Any) -> Recording:
        return self

    def limit(self, _: int) -> Recording:
        return self

    def __aiter__(self) -> Recording:
        return self

    async def __anext__(self) -> dict[str, Any]:
        raise StopAsyncIteration


async def test_every_read_of_the_routes_runs_under_the_limit() -> None:
    seen: list[float | None] = []
    model = ReadModel({"instances": Recording(seen), "analyses": Recording(seen)}, read_timeout_s=2.5)
    await model.get("id")
    await model.analysis("a")
    await model.for_patient("t", "pk", 10)
    await model.analyses_of("t", 10)
    await model.upload_statuses("t", "u")
    await model.upload_page("t", "u", 10)
    assert len(seen) == 6
    assert all(t is not None and 2.0 < t <= 2.5 for t in seen), seen
    assert _csot.get_timeout() is None  # nothing outside the reads


def test_the_limit_defaults_to_10_s_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings().read_timeout_s == 10.0
    for wrong in ("0", "121"):
        monkeypatch.setenv("ENCLAVE_GATEWAY_READ_TIMEOUT_S", wrong)
        with pytest.raises(ValidationError, match="read_timeout_s"):
            GatewaySettings()


async def test_the_grant_and_restriction_lookups_of_a_decision_run_under_the_limit() -> None:
    """A caregiver's read looks its grants up, a clinician's PHI read the patient's restriction, an
    admin's grant route the grant: each under the same limit (until the twenty-second session they had
    pymongo's ~30 s bound while the read model's reads had this one)."""
    from datetime import UTC, datetime

    from enclave_common.auth import GrantQuery
    from enclave_common.auth.grants_mongo import MongoGrantStore
    from enclave_common.auth.restrictions_mongo import MongoRestrictionStore

    seen: list[float | None] = []
    grants = MongoGrantStore({"grants": Recording(seen)}, read_timeout_s=2.5)  # type: ignore[arg-type]
    restrictions = MongoRestrictionStore(
        {"restrictions": Recording(seen), "restriction_history": None}, read_timeout_s=2.5
    )  # type: ignore[arg-type]
    await grants.get("g", tenant="t")
    await grants.active_for("s", "t", "pk", datetime.now(UTC))
    await restrictions.get("t", "pk")
    await restrictions.list("t", limit=10)
    await grants.list("t", GrantQuery(), limit=10)
    assert len(seen) == 5
    assert all(t is not None and 2.0 < t <= 2.5 for t in seen), seen
    assert _csot.get_timeout() is None


class RecordingWrites:
    """A collection that notes the operation timeout of each write; its insert finds the first id
    taken (an event overtook the upload), so the upload's fields are then set on that record."""

    def __init__(self, seen: list[float | None]) -> None:
        self.seen = seen

    async def insert_many(self, docs: list[dict[str, Any]], ordered: bool) -> None:
        from pymongo.errors import BulkWriteError

        self.seen.append(_csot.get_timeout())
        raise BulkWriteError({"writeErrors": [{"index": 0, "code": 11000}]})

    async def update_one(self, query: dict[str, Any], update: dict[str, Any]) -> None:
        self.seen.append(_csot.get_timeout())


async def test_an_uploads_record_writes_run_under_the_write_limit() -> None:
    """Until the twenty-second session a silent database held an upload's record write for pymongo's
    ~30 s, and the upload's slot and client with it."""
    from enclave_common.pseudonyms import InstanceKeys

    seen: list[float | None] = []
    model = ReadModel({"instances": RecordingWrites(seen), "analyses": None}, write_timeout_s=2.5)
    keys = InstanceKeys("pk", "sk", "se", "ik")
    await model.record_uploads("t", "up-1", [("id-1", keys, "1.2.3"), ("id-2", keys, "1.2.3")])
    assert len(seen) == 2  # the group's insert, then the overtaken record's update
    assert all(t is not None and 2.0 < t <= 2.5 for t in seen), seen


def test_the_write_limit_defaults_to_10_s_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings().write_timeout_s == 10.0
    for wrong in ("0", "121"):
        monkeypatch.setenv("ENCLAVE_GATEWAY_WRITE_TIMEOUT_S", wrong)
        with pytest.raises(ValidationError, match="write_timeout_s"):
            GatewaySettings()
