"""Buckets at service start, on the real MinIO (``S3ObjectStore.ensure_bucket``): what is missing is
created or turned on (``ENCLAVE_S3_CREATE_BUCKETS=true``, the local stack), or, for buckets
provisioned beforehand, checked without writing anything and refused by name; an operator's
encryption configuration is never replaced."""

from __future__ import annotations

import pytest
from enclave_common.errors import ConfigurationError
from enclave_common.settings import BaseServiceSettings
from enclave_common.storage import S3ObjectStore

from .conftest import S3_ENDPOINT, S3_KEY, S3_SECRET


def store(*, create: bool) -> S3ObjectStore:
    return S3ObjectStore(
        BaseServiceSettings(
            service_name="it-buckets",
            s3_endpoint_url=S3_ENDPOINT,
            s3_access_key_id=S3_KEY,
            s3_secret_access_key=S3_SECRET,
            s3_create_buckets=create,
        )
    )


def encryption(s3, bucket: str) -> dict:
    return s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0][
        "ApplyServerSideEncryptionByDefault"
    ]


async def test_without_creation_a_missing_bucket_is_refused_by_name(s3, unique):
    bucket = f"it-missing-{unique}"
    with pytest.raises(
        ConfigurationError, match=f"bucket {bucket} does not exist.*ENCLAVE_S3_CREATE_BUCKETS"
    ):
        await store(create=False).ensure_bucket(bucket)
    assert bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}


async def test_a_bare_bucket_is_refused_unchanged_then_completed_when_creation_is_allowed(s3, unique):
    bucket = f"it-bare-{unique}"
    s3.create_bucket(Bucket=bucket)
    with pytest.raises(ConfigurationError) as refused:
        await store(create=False).ensure_bucket(bucket)
    assert str(refused.value) == (
        f"bucket {bucket}: versioning is not enabled; it has no default server-side encryption"
    )
    assert s3.get_bucket_versioning(Bucket=bucket).get("Status") != "Enabled"  # nothing was written

    await store(create=True).ensure_bucket(bucket)
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    assert encryption(s3, bucket)["SSEAlgorithm"] == "AES256"
    await store(create=False).ensure_bucket(bucket)  # now complete: the check passes


async def test_an_operators_kms_encryption_is_kept(s3, unique):
    bucket = f"it-kms-{unique}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_encryption(
        Bucket=bucket,
        ServerSideEncryptionConfiguration={
            "Rules": [
                {
                    "ApplyServerSideEncryptionByDefault": {
                        "SSEAlgorithm": "aws:kms",
                        "KMSMasterKeyID": "enclave-local",  # the local MinIO's KMS key (scripts/stack/up.sh)
                    }
                }
            ]
        },
    )
    await store(create=True).ensure_bucket(bucket)
    assert encryption(s3, bucket)["SSEAlgorithm"] == "aws:kms"
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"


async def test_an_object_lock_bucket_must_have_been_created_with_it(s3, unique):
    bucket = f"it-nolock-{unique}"
    await store(create=True).ensure_bucket(bucket)
    with pytest.raises(ConfigurationError, match="Object Lock is not enabled"):
        await store(create=True).ensure_bucket(bucket, object_lock=True)
    locked = f"it-lock-{unique}"
    await store(create=True).ensure_bucket(locked, object_lock=True)
    await store(create=False).ensure_bucket(locked, object_lock=True)
    assert s3.get_object_lock_configuration(Bucket=locked)["ObjectLockConfiguration"][
        "ObjectLockEnabled"
    ] == ("Enabled")
