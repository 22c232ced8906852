"""Deleting every version of a key: refusals inside a 200 answer raise, other keys are left alone."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber
from enclave_common.errors import PermanentError, TransientError
from enclave_common.storage import S3ObjectStore


def _store() -> tuple[S3ObjectStore, Stubber]:
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
    store = S3ObjectStore.__new__(S3ObjectStore)
    store._client = client
    store._create = False
    return store, Stubber(client)


def _listing(stub: Stubber, page: dict, **markers: str) -> None:
    stub.add_response(
        "list_object_versions",
        {"IsTruncated": False, **page},
        {"Bucket": "b", "Prefix": "keys/t/s.json", **markers},
    )


async def test_every_version_and_marker_of_exactly_that_key_is_deleted_across_pages() -> None:
    store, stub = _store()
    stub.add_response(
        "list_object_versions",
        {
            "IsTruncated": True,
            "NextKeyMarker": "keys/t/s.json",
            "NextVersionIdMarker": "v2",
            "Versions": [
                {"Key": "keys/t/s.json", "VersionId": "v1"},
                {"Key": "keys/t/s.json", "VersionId": "v2"},
            ],
        },
        {"Bucket": "b", "Prefix": "keys/t/s.json"},
    )
    _listing(
        stub,
        {
            "Versions": [{"Key": "keys/t/s.json.bak", "VersionId": "other"}],
            "DeleteMarkers": [{"Key": "keys/t/s.json", "VersionId": "m1"}],
        },
        KeyMarker="keys/t/s.json",
        VersionIdMarker="v2",
    )
    stub.add_response(
        "delete_objects",
        {},
        {
            "Bucket": "b",
            "Delete": {
                "Objects": [
                    {"Key": "keys/t/s.json", "VersionId": "v1"},
                    {"Key": "keys/t/s.json", "VersionId": "v2"},
                    {"Key": "keys/t/s.json", "VersionId": "m1"},
                ],
                "Quiet": True,
            },
        },
    )
    with stub:
        assert await store.delete_all_versions("b", "keys/t/s.json") == 3
    stub.assert_no_pending_responses()


async def test_a_refusal_inside_the_200_answer_raises_instead_of_counting_as_deleted() -> None:
    """S3's DeleteObjects answers 200 and lists the versions it refused (no s3:DeleteObject, Object
    Lock): a crypto-shred that ignored them would report a study key destroyed that still exists."""
    store, stub = _store()
    _listing(stub, {"Versions": [{"Key": "keys/t/s.json", "VersionId": "v1"}]})
    stub.add_response(
        "delete_objects",
        {"Errors": [{"Key": "keys/t/s.json", "VersionId": "v1", "Code": "AccessDenied", "Message": "no"}]},
    )
    with stub, pytest.raises(PermanentError) as refused:
        await store.delete_all_versions("b", "keys/t/s.json")
    assert refused.value.code == "s3_AccessDenied"
    assert "1 of 1 versions" in str(refused.value)


async def test_a_refusal_that_says_later_is_transient() -> None:
    store, stub = _store()
    _listing(stub, {"Versions": [{"Key": "keys/t/s.json", "VersionId": "v1"}]})
    stub.add_response(
        "delete_objects", {"Errors": [{"Key": "keys/t/s.json", "VersionId": "v1", "Code": "SlowDown"}]}
    )
    with stub, pytest.raises(TransientError):
        await store.delete_all_versions("b", "keys/t/s.json")


async def test_nothing_stored_deletes_nothing() -> None:
    store, stub = _store()
    _listing(stub, {})
    with stub:
        assert await store.delete_all_versions("b", "keys/t/s.json") == 0
    stub.assert_no_pending_responses()
