"""Each service's object-store identity can do its work and nothing else (deploy/iam/, on real MinIO).

`make up` gives ingest, deid, analysis and audit their own MinIO users bound to the policies in
deploy/iam/ (the documents production gives their IAM roles) and starts each service with its user;
the gateway gets none. The rest of the integration suite runs the pipeline through those services, so
it proves the policies suffice; this file proves they deny what the service has no business doing:
one table, every cell tried against MinIO with the service's own keys.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import time
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from .conftest import S3_ENDPOINT, S3_KEY, S3_SECRET
from .support import ROOT, STATE, service_identity

ORIGINALS, DEIDENTIFIED, RESULTS, WORM = (
    "enclave-originals",
    "enclave-deidentified",
    "enclave-results",
    "enclave-audit-worm",
)
IDENTITIES = ("ingest", "deid", "analysis", "audit")

#: Where each object lives: (bucket, key prefix).
PLACES = {
    "originals": (ORIGINALS, "originals/"),
    "study_keys": (ORIGINALS, "keys/"),
    "deidentified": (DEIDENTIFIED, "deidentified/"),
    "reports": (RESULTS, "reports/"),
    "deidentified_reports": (DEIDENTIFIED, "reports/"),  # the results bucket's default before
    "worm": (WORM, "iam-test/"),
}
#: abort_upload: start a multipart upload and abort it (boto3 switches to multipart above 8 MiB and
#: aborts on a failure; a refused abort leaves the parts stored, unlisted).
OPERATIONS = ("put", "get", "delete_version", "abort_upload")

#: (service, place) -> the operations allowed; every other operation on every place is denied.
ALLOWED: dict[tuple[str, str], set[str]] = {
    ("ingest", "originals"): {"put", "get"},
    ("ingest", "study_keys"): {"put", "get", "delete_version"},
    ("deid", "originals"): {"get"},
    ("deid", "study_keys"): {"get"},
    ("deid", "deidentified"): {"put", "get", "delete_version"},
    ("analysis", "deidentified"): {"get"},
    ("analysis", "reports"): {"put", "get", "delete_version"},
    ("audit", "worm"): {"put", "get"},
}

CELLS = [
    (service, place, operation) for service in IDENTITIES for place in PLACES for operation in OPERATIONS
]


def _keys(service: str) -> tuple[str, str]:
    identity = service_identity(service)
    return identity["ENCLAVE_S3_ACCESS_KEY_ID"], identity["ENCLAVE_S3_SECRET_ACCESS_KEY"]


@functools.cache
def _identity(service: str):
    """A client with the service's own keys (one per service for the module's hundred cells)."""
    return _client(*_keys(service))


def _client(key: str, secret: str):
    return boto3.client(
        "s3",
        endpoint_url=S3_ENDPOINT,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
    )


#: Seconds an identity's test object in the WORM bucket is retained (COMPLIANCE: nobody may remove it
#: before, so the test waits this long before it removes it).
WORM_TEST_RETENTION_S = 2


def _put(client, bucket: str, key: str, *, mode: str = "COMPLIANCE"):
    extra = {}
    if bucket == WORM:  # the audit service writes its checkpoints under a COMPLIANCE retention
        extra = _retention(mode)
    return client.put_object(Bucket=bucket, Key=key, Body=b"iam test", **extra)["VersionId"]


def _retention(mode: str) -> dict:
    """Object Lock headers: COMPLIANCE (what the audit service writes, and all its policy lets it
    write) retained ``WORM_TEST_RETENTION_S``; GOVERNANCE (the root user's seeded objects, which it may
    remove at once, bypassing the retention) for a day."""
    if mode == "COMPLIANCE":
        until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=WORM_TEST_RETENTION_S)
    else:
        until = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    return {"ObjectLockMode": mode, "ObjectLockRetainUntilDate": until}


@pytest.fixture(scope="module")
def root():
    """The root user of `make up`'s MinIO (dev.env), as the tests and admin commands use it."""
    return _client(S3_KEY, S3_SECRET)


@pytest.fixture(scope="module")
def seeded(root):
    """One object per place, written with the root user (each identity then tries to read it)."""
    made = {}
    for place, (bucket, prefix) in PLACES.items():
        key = f"{prefix}iam-test-{os.urandom(6).hex()}"
        made[place] = (bucket, key, _put(root, bucket, key, mode="GOVERNANCE"))
    yield made
    for bucket, key, _ in made.values():
        _remove_all_versions(root, bucket, key)


def _remove_all_versions(root, bucket: str, key: str) -> None:
    """Every version of ``key``, removed by the root user: in the WORM bucket bypassing a GOVERNANCE
    retention, and once a COMPLIANCE one (``WORM_TEST_RETENTION_S``) has passed."""
    deadline = time.monotonic() + WORM_TEST_RETENTION_S + 10
    listed = root.list_object_versions(Bucket=bucket, Prefix=key)
    for version in listed.get("Versions", []) + listed.get("DeleteMarkers", []):
        while True:
            try:
                root.delete_object(
                    Bucket=bucket,
                    Key=version["Key"],
                    VersionId=version["VersionId"],
                    **({"BypassGovernanceRetention": True} if bucket == WORM else {}),
                )
                break
            except ClientError as exc:
                # MinIO answers InvalidRequest ("Object is WORM protected"), AWS AccessDenied
                if bucket != WORM or exc.response["Error"]["Code"] not in ("AccessDenied", "InvalidRequest"):
                    raise
                assert time.monotonic() < deadline, f"a test object stays retained in {bucket}"
                time.sleep(0.5)


def _attempt(client, root, operation: str, bucket: str, key: str, version: str) -> str:
    """``allowed`` or the S3 error code; every object this makes is removed by the root user."""
    try:
        if operation == "put":
            _put(client, bucket, f"{key}-{operation}")
        elif operation == "get":
            client.get_object(Bucket=bucket, Key=key, VersionId=version)["Body"].read()
        elif operation == "abort_upload":
            lock = _retention("COMPLIANCE") if bucket == WORM else {}
            upload = client.create_multipart_upload(Bucket=bucket, Key=f"{key}-mpu", **lock)["UploadId"]
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=f"{key}-mpu", UploadId=upload)
            except ClientError:
                root.abort_multipart_upload(Bucket=bucket, Key=f"{key}-mpu", UploadId=upload)
                raise
        else:
            target = root.put_object(Bucket=bucket, Key=f"{key}-target", Body=b"x")["VersionId"]
            client.delete_object(Bucket=bucket, Key=f"{key}-target", VersionId=target)
        return "allowed"
    except ClientError as exc:
        return str(exc.response["Error"]["Code"])
    finally:
        if operation in ("put", "delete_version"):
            _remove_all_versions(root, bucket, f"{key}-{operation if operation == 'put' else 'target'}")


@pytest.mark.parametrize(("service", "place", "operation"), CELLS)
def test_each_identity_may_do_its_work_and_nothing_else(service, place, operation, seeded, root):
    bucket, key, version = seeded[place]
    got = _attempt(_identity(service), root, operation, bucket, key, version)
    allowed = ALLOWED.get((service, place), set())
    if "put" in allowed:
        allowed = allowed | {"abort_upload"}  # whoever writes must be able to abandon a write
    expected = "allowed" if operation in allowed else "AccessDenied"
    assert got == expected, f"{service} {operation} on {place}: {got}, expected {expected}"


@pytest.mark.parametrize("mode", [None, "GOVERNANCE"])
def test_audit_writes_the_worm_bucket_only_under_a_compliance_retention(root, mode):
    """Its policy denies a write without Object Lock's COMPLIANCE mode: audit's identity cannot leave
    an object there that is not retained, or whose GOVERNANCE retention an administrator could
    bypass and delete (until the twentieth session the policy allowed both; the service itself
    always wrote COMPLIANCE)."""
    key = f"iam-test/lock-{os.urandom(6).hex()}"
    extra = _retention(mode) if mode else {}
    try:
        with pytest.raises(ClientError) as denied:
            _identity("audit").put_object(Bucket=WORM, Key=key, Body=b"iam test", **extra)
        assert denied.value.response["Error"]["Code"] == "AccessDenied"
        _put(_identity("audit"), WORM, key)  # COMPLIANCE, as the service writes: allowed
    finally:
        _remove_all_versions(root, WORM, key)


def test_no_identity_may_create_a_bucket_or_change_its_configuration():
    """The buckets are provisioned beforehand (production's platform; locally `make up` as root): the
    services read their configuration at start and never change it, their own buckets included."""
    for service in IDENTITIES:
        for bucket in (ORIGINALS, DEIDENTIFIED, RESULTS, WORM):
            client = _identity(service)
            with pytest.raises(ClientError) as denied:  # "Enabled": no harm done if it were allowed
                client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
            assert denied.value.response["Error"]["Code"] == "AccessDenied", (service, bucket)
            with pytest.raises(ClientError) as denied:
                client.create_bucket(Bucket=f"it-iam-{service}-{os.urandom(4).hex()}")
            assert denied.value.response["Error"]["Code"] == "AccessDenied", service


def _environment(service: str) -> dict[str, str]:
    pid = (STATE / "pids" / f"{service}.pid").read_text().strip()
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_the_running_services_use_their_own_identities_and_the_gateway_none():
    """What `make up` started: each service with its own user's keys, the gateway with no S3 keys at
    all (it seals to ingest's public key and never touches the store)."""
    gateway = _environment("gateway")
    assert "ENCLAVE_S3_ACCESS_KEY_ID" not in gateway and "ENCLAVE_S3_SECRET_ACCESS_KEY" not in gateway
    for service in IDENTITIES:
        key, secret = _keys(service)
        env = _environment(service)
        assert env.get("ENCLAVE_S3_ACCESS_KEY_ID") == key == f"enclave-{service}"
        assert env.get("ENCLAVE_S3_SECRET_ACCESS_KEY") == secret


def test_no_identity_learns_of_buckets_its_policy_does_not_name(root):
    """Readiness asks the store for the service's own bucket (HeadBucket), and no policy grants
    s3:ListAllMyBuckets: AWS refuses the listing; MinIO answers with the buckets the identity may use.
    Either way no service learns which other buckets (other services', tenants' test buckets) exist."""
    everything = {bucket["Name"] for bucket in root.list_buckets()["Buckets"]}
    for service in IDENTITIES:
        policy = json.loads((ROOT / "deploy" / "iam" / f"enclave-{service}.json").read_text())
        named = {
            resource.split(":::", 1)[1].split("/", 1)[0]
            for statement in policy["Statement"]
            for resource in statement["Resource"]
        }
        refused, seen = "", set()
        try:
            seen = {bucket["Name"] for bucket in _identity(service).list_buckets()["Buckets"]}
        except ClientError as exc:
            refused = exc.response["Error"]["Code"]
        assert refused in ("", "AccessDenied"), (service, refused)
        assert seen <= named, (service, seen - named)
        assert everything - named, "the root user sees buckets no policy names (the test's premise)"


def test_an_identity_reads_no_other_bucket_listing(root):
    """Object keys are opaque, but which buckets hold what is still not another service's business:
    listing a bucket the policy does not name is refused."""
    for service, foreign in (("ingest", DEIDENTIFIED), ("analysis", ORIGINALS), ("audit", ORIGINALS)):
        with pytest.raises(ClientError) as denied:
            _identity(service).list_objects_v2(Bucket=foreign, MaxKeys=1)
        assert denied.value.response["Error"]["Code"] == "AccessDenied", service
    assert root.list_objects_v2(Bucket=ORIGINALS, MaxKeys=1)["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_the_keys_files_are_private():
    for service in IDENTITIES:
        assert (STATE / "s3" / f"{service}.env").stat().st_mode & 0o077 == 0
    assert (STATE / "s3").stat().st_mode & 0o077 == 0


def test_root_can_still_inspect_everything(root, seeded):
    """The test suite and admin commands keep the root user (dev.env): the identities restrict the
    services, not the operator."""
    for bucket, key, version in seeded.values():
        assert root.get_object(Bucket=bucket, Key=key, VersionId=version)["Body"].read() == b"iam test"


async def test_a_deletion_the_store_refuses_is_an_error_not_a_count(root, seeded):
    """``DeleteObjects`` answers 200 and lists what it refused. Deid may read the study-key records
    but not delete them: through the services' own store class the refusal must raise, or a
    crypto-shred run with the wrong identity would report a key destroyed that still opens the study."""
    from enclave_common.errors import PermanentError
    from enclave_common.settings import BaseServiceSettings
    from enclave_common.storage import S3ObjectStore

    key, secret = _keys("deid")
    store = S3ObjectStore(
        BaseServiceSettings(
            s3_endpoint_url=S3_ENDPOINT,
            s3_access_key_id=key,
            s3_secret_access_key=secret,
            s3_region="us-east-1",
        )
    )
    bucket, object_key, version = seeded["study_keys"]
    with pytest.raises(PermanentError) as refused:
        await store.delete_all_versions(bucket, object_key)
    assert refused.value.code == "s3_AccessDenied"
    assert root.get_object(Bucket=bucket, Key=object_key, VersionId=version)["Body"].read() == b"iam test"
