"""Verifying the trail reads each checkpoint's WORM copy from the object store. A store that does not
answer says nothing about the trail: the call fails (503, retry) instead of reporting "the WORM copy
could not be read", a verification failure that counts as possible tampering. A copy the store says
is gone is still reported as a problem of its checkpoint."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError
from enclave_audit import api
from enclave_common.errors import PermanentError


class Objects:
    def __init__(self, failure: Exception) -> None:
        self.failure = failure

    async def open(self, bucket: str, key: str, version_id: str | None = None) -> Any:
        raise self.failure


class Store:
    async def checkpoints_between(self, first: int, last: int | None) -> list[Any]:
        return [SimpleNamespace(object_key="checkpoints/1-100.json", version_id="v1")]


def context(failure: Exception) -> Any:
    return SimpleNamespace(
        store=Store(), objects=Objects(failure), bucket="audit", reader=None, public_key=None
    )


async def test_a_store_that_does_not_answer_fails_the_call_instead_of_failing_the_verification(monkeypatch):
    verified: list[Any] = []
    monkeypatch.setattr(api, "verify_trail", lambda *a, **k: verified.append(k))
    with pytest.raises(EndpointConnectionError):
        await api.verify_stored(context(EndpointConnectionError(endpoint_url="http://minio")), 1, None)
    assert verified == []  # nothing was reported about the trail


async def test_a_copy_the_store_says_is_gone_is_still_a_problem_of_its_checkpoint(monkeypatch):
    verified: list[Any] = []
    monkeypatch.setattr(api, "verify_trail", lambda *a, **k: verified.append(k) or "report")
    missing = PermanentError("object store get failed (NoSuchKey)", code="s3_NoSuchKey")
    assert await api.verify_stored(context(missing), 1, None) == "report"
    assert verified[0]["worm_copies"] == {}  # verify_trail reports the copy as unreadable


class CliStore:
    failure: Exception

    def __init__(self, settings: Any) -> None:
        pass

    async def open(self, bucket: str, key: str, version_id: str | None = None) -> Any:
        raise CliStore.failure


def test_the_cli_stops_when_the_store_does_not_answer_and_reports_a_copy_that_is_gone(monkeypatch, capsys):
    from enclave_audit import cli

    monkeypatch.setattr(cli, "S3ObjectStore", CliStore)
    settings: Any = SimpleNamespace(worm_bucket="audit")
    entries: Any = [SimpleNamespace(object_key="checkpoints/1-100.json", version_id="v1")]
    CliStore.failure = EndpointConnectionError(endpoint_url="http://minio")
    with pytest.raises(EndpointConnectionError):  # main() turns it into exit 2, "nothing was verified"
        cli._worm_copies(settings, entries)
    CliStore.failure = PermanentError("object store get failed (NoSuchKey)", code="s3_NoSuchKey")
    assert cli._worm_copies(settings, entries) == {}  # verify_trail reports it: exit 1
    assert "warn  checkpoints/1-100.json: PermanentError" in capsys.readouterr().err
