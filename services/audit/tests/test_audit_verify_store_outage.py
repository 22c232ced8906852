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

KEY = "checkpoints/000000000001-000000000100.json"
ENTRY = SimpleNamespace(object_key=KEY, version_id="v1", checkpoint=SimpleNamespace(first_sequence=1))


class Objects:
    def __init__(self, failure: Exception) -> None:
        self.failure = failure

    async def open(self, bucket: str, key: str, version_id: str | None = None) -> Any:
        raise self.failure

    async def list_versions(self, bucket: str, prefix: str, **_: Any) -> list[tuple[str, str]]:
        return [(KEY, "v1")]


class Store:
    async def checkpoints_between(self, first: int, last: int | None) -> list[Any]:
        return [ENTRY]


def context(failure: Exception) -> Any:
    return SimpleNamespace(
        store=Store(), objects=Objects(failure), bucket="audit", reader=None, trusted_keys={}
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

    async def list_versions(self, bucket: str, prefix: str, **_: Any) -> list[tuple[str, str]]:
        return [(KEY, "v1")]


def test_the_cli_stops_when_the_store_does_not_answer_and_reports_a_copy_that_is_gone(monkeypatch, capsys):
    from enclave_audit import cli

    monkeypatch.setattr(cli, "S3ObjectStore", CliStore)
    settings: Any = SimpleNamespace(worm_bucket="audit")
    CliStore.failure = EndpointConnectionError(endpoint_url="http://minio")
    with pytest.raises(EndpointConnectionError):  # main() turns it into exit 2, "nothing was verified"
        cli._stored(settings, 1, None)
    CliStore.failure = PermanentError("object store get failed (NoSuchKey)", code="s3_NoSuchKey")
    assert cli._stored(settings, 1, None) == []  # verify_trail reports the indexed copy: exit 1
    assert f"warn  {KEY}: PermanentError" in capsys.readouterr().err


class CliDatabase:
    """What ``cli.main`` needs of MongoClient and SyncRecordReader, without a database."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getitem__(self, name: str) -> Any:
        return self

    def close(self) -> None:
        pass

    def checkpoints_between(self, first: int, last: int | None) -> list[Any]:
        return [ENTRY]


@pytest.mark.parametrize("code", ["InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_wrong_s3_credentials_are_named_by_their_s3_error_code(code, monkeypatch, capsys):
    """Before: "cannot read the WORM bucket: TransientError", whatever S3 answered."""
    from botocore.exceptions import ClientError
    from enclave_audit import cli
    from enclave_common.storage import s3_error

    monkeypatch.setattr(cli, "MongoClient", CliDatabase)
    monkeypatch.setattr(cli, "SyncRecordReader", CliDatabase)
    monkeypatch.setattr(cli, "S3ObjectStore", CliStore)
    answer: Any = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": 403}}
    CliStore.failure = s3_error(ClientError(answer, "GetObject"), "get")
    monkeypatch.delenv("ENCLAVE_AUDIT_SIGNING_KEY_FILE", raising=False)
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert f"cannot read the WORM bucket: object store get failed ({code}); nothing was verified" in err


def test_missing_s3_credentials_are_a_setup_problem_not_a_verification_failure(monkeypatch, capsys):
    """Before: each WORM copy "could not be read" and the answer was NOT VERIFIED, exit 1, as if the
    copies were gone; the CLI now stops, exit 2, and names what is missing."""
    from botocore.exceptions import NoCredentialsError
    from enclave_audit import cli

    monkeypatch.setattr(cli, "MongoClient", CliDatabase)
    monkeypatch.setattr(cli, "SyncRecordReader", CliDatabase)
    monkeypatch.setattr(cli, "S3ObjectStore", CliStore)
    CliStore.failure = NoCredentialsError()
    monkeypatch.delenv("ENCLAVE_AUDIT_SIGNING_KEY_FILE", raising=False)
    assert cli.main([]) == 2
    assert "cannot read the WORM bucket: NoCredentialsError; nothing was verified" in capsys.readouterr().err


async def test_a_range_inside_a_checkpoint_longer_than_the_span_cap_still_lists_it(monkeypatch):
    """Deployments that ran with CHECKPOINT_EVERY_RECORDS above today's cap have longer checkpoints:
    the listing starts at the first indexed one overlapping the range when that is further back."""
    from enclave_audit.checkpoints import checkpoint_key_prefix

    listed: list[str] = []

    class Listing(Objects):
        async def list_versions(self, bucket: str, prefix: str, **kwargs: Any) -> list[tuple[str, str]]:
            listed.append(kwargs["after"])
            return []

    ctx = context(EndpointConnectionError(endpoint_url="http://minio"))
    ctx.objects = Listing(ctx.objects.failure)
    monkeypatch.setattr(api, "verify_trail", lambda *a, **k: "report")
    long_entry = SimpleNamespace(
        object_key=KEY, version_id="v1", checkpoint=SimpleNamespace(first_sequence=1)
    )

    async def between(first: int, last: int | None) -> list[Any]:
        return [long_entry]

    ctx.store.checkpoints_between = between
    assert await api.verify_stored(ctx, 50_000, 50_010) == "report"
    assert listed == [checkpoint_key_prefix(1)]
