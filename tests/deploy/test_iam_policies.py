"""The services' S3 policies (deploy/iam/) against what the services are configured to use.

tests/integration/test_s3_identities.py proves on MinIO that each policy allows the service's work and
denies the rest; this checks, without a network, that the documents name every bucket the services
and deploy/k8s configure, that the key prefixes are the ones the code writes, and that no policy grants
what no service needs (administration of buckets or their protection).
"""

from __future__ import annotations

import json

import pytest
from enclave_analysis.config import AnalysisSettings
from enclave_audit.config import AuditSettings
from enclave_common.envelope import new_event_id
from enclave_common.study_key_objects import KEY_PREFIX
from enclave_deid.config import DeidSettings
from enclave_deid.handlers import deid_object_key
from enclave_ingest.config import IngestSettings

from .conftest import REPO_ROOT

IAM = REPO_ROOT / "deploy" / "iam"
STORE_USERS = ("ingest", "deid", "analysis", "audit")

#: What no service may do to a bucket or its protection: the platform's, not the services'.
NEVER = {
    "s3:*",
    "s3:DeleteBucket",
    "s3:DeleteBucketPolicy",
    "s3:PutBucketPolicy",
    "s3:PutBucketAcl",
    "s3:PutObjectAcl",
    "s3:BypassGovernanceRetention",
    "s3:PutObjectLegalHold",
    "s3:PutLifecycleConfiguration",
    "s3:PutReplicationConfiguration",
    "s3:DeleteObjectTagging",
    # the buckets are provisioned beforehand; a service only reads their configuration
    "s3:CreateBucket",
    "s3:PutBucketVersioning",
    "s3:PutEncryptionConfiguration",
    "s3:PutBucketObjectLockConfiguration",
}


def _policy(service: str) -> dict:
    return json.loads((IAM / f"enclave-{service}.json").read_text())


def _grants(service: str) -> set[tuple[str, str]]:
    """(action, resource ARN) pairs the service's policy allows."""
    return {
        (action, resource)
        for statement in _policy(service)["Statement"]
        if statement["Effect"] == "Allow"
        for action in statement["Action"]
        for resource in statement["Resource"]
    }


def _k8s_env(service: str) -> dict[str, str]:
    path = REPO_ROOT / "deploy" / "k8s" / "base" / "services" / f"{service}.env"
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("=", 1) for line in lines)


def _buckets(service: str) -> dict[str, set[str]]:
    """Bucket setting -> its values: the code's default and deploy/k8s's."""
    settings = {
        "ingest": (IngestSettings, ("originals_bucket",)),
        "deid": (DeidSettings, ("originals_bucket", "deidentified_bucket")),
        "analysis": (AnalysisSettings, ("deidentified_bucket", "results_bucket")),
        "audit": (AuditSettings, ("worm_bucket",)),
    }[service]
    cls, fields = settings
    env = _k8s_env(service)
    return {
        field: {cls.model_fields[field].default, env.get(f"ENCLAVE_{service.upper()}_{field.upper()}")}
        - {None}
        for field in fields
    }


def test_only_the_services_that_use_the_store_have_a_policy_and_the_gateway_no_s3_secret():
    assert sorted(path.stem for path in IAM.glob("*.json")) == sorted(f"enclave-{s}" for s in STORE_USERS)
    gateway = (REPO_ROOT / "deploy" / "k8s" / "base" / "services" / "gateway.yaml").read_text()
    assert "ENCLAVE_S3_" not in gateway and "-s3" not in gateway


@pytest.mark.parametrize("service", STORE_USERS)
def test_each_document_is_an_allow_only_iam_policy_without_administration(service):
    policy = _policy(service)
    assert policy["Version"] == "2012-10-17"
    sids = [statement["Sid"] for statement in policy["Statement"]]
    assert len(sids) == len(set(sids)), sids
    for statement in policy["Statement"]:
        if statement["Effect"] == "Deny":  # a guard on what is allowed, only under a condition
            assert set(statement) == {"Sid", "Effect", "Action", "Resource", "Condition"}, statement["Sid"]
            continue
        assert set(statement) == {"Sid", "Effect", "Action", "Resource"}, statement["Sid"]
        assert statement["Effect"] == "Allow"
        assert all(action.startswith("s3:") and "*" not in action for action in statement["Action"])
        assert not NEVER & set(statement["Action"]), statement["Sid"]
        for resource in statement["Resource"]:
            # a bucket or objects in it by name: never every bucket (readiness is a HeadBucket of the
            # service's own, not ListAllMyBuckets, which would show it every bucket of the account)
            assert resource.startswith("arn:aws:s3:::enclave-"), resource


@pytest.mark.parametrize("service", STORE_USERS)
def test_every_configured_bucket_is_covered_for_the_start_up_check(service):
    """The check at start (ensure_bucket) reads each bucket's configuration: a bucket the service or
    deploy/k8s names but the policy does not would stop the service from starting."""
    grants = _grants(service)
    for field, buckets in _buckets(service).items():
        if (service, field) == ("deid", "originals_bucket"):
            continue  # deid only reads originals; ingest checks that bucket
        for bucket in buckets:
            for action in ("s3:ListBucket", "s3:GetBucketVersioning", "s3:GetEncryptionConfiguration"):
                assert (action, f"arn:aws:s3:::{bucket}") in grants, (service, field, bucket, action)


def test_the_prefixes_are_the_ones_the_code_writes():
    """Objects are granted by prefix; these are where the code puts them."""
    deid_key = deid_object_key(new_event_id(), "instance")
    assert deid_key.startswith("deidentified/")
    assert KEY_PREFIX == "keys/"
    ingest = (REPO_ROOT / "services/ingest/src/enclave_ingest/pipeline.py").read_text()
    assert 'object_key = f"originals/{meta.instance_upload_id}"' in ingest
    analysis = (REPO_ROOT / "services/analysis/src/enclave_analysis/handlers.py").read_text()
    assert 'key = f"reports/{analysis_id}/{name}"' in analysis


def _writers(place: str) -> set[str]:
    return {
        service
        for service in STORE_USERS
        for action, resource in _grants(service)
        if action in ("s3:PutObject", "s3:DeleteObject", "s3:DeleteObjectVersion")
        and resource.split(":::", 1)[1].startswith(place)
    }


def test_audit_may_write_only_under_a_compliance_retention():
    """Its writes to the WORM bucket are denied unless they carry Object Lock's COMPLIANCE mode (an
    object not retained, or retained in GOVERNANCE mode, which an administrator may bypass, cannot
    be written); MinIO and AWS both evaluate ``s3:object-lock-mode`` (tests/integration/
    test_s3_identities.py tries it)."""
    denies = [s for s in _policy("audit")["Statement"] if s["Effect"] == "Deny"]
    assert denies == [
        {
            "Sid": "CheckpointsOnlyUnderComplianceRetention",
            "Effect": "Deny",
            "Action": ["s3:PutObject"],
            "Resource": ["arn:aws:s3:::enclave-audit-worm/*"],
            "Condition": {"StringNotEquals": {"s3:object-lock-mode": "COMPLIANCE"}},
        }
    ]
    for service in STORE_USERS:
        if service != "audit":
            assert all(s["Effect"] == "Allow" for s in _policy(service)["Statement"]), service


def test_each_place_has_exactly_one_writer():
    """One service writes and deletes each kind of object; the others at most read it."""
    assert _writers("enclave-originals/originals/") == {"ingest"}
    assert _writers("enclave-originals/keys/") == {"ingest"}
    assert _writers("enclave-deidentified/deidentified/") == {"deid"}
    assert _writers("enclave-deidentified/reports/") == set()  # analysis writes its own bucket
    assert _writers("enclave-results/") == {"analysis"}
    assert _writers("enclave-audit-worm/") == {"audit"}


def test_nothing_deletes_in_the_worm_bucket_or_the_originals():
    for service in STORE_USERS:
        for action, resource in _grants(service):
            if action.startswith("s3:Delete"):
                assert not resource.startswith("arn:aws:s3:::enclave-audit-worm"), service
                assert not resource.startswith("arn:aws:s3:::enclave-originals/originals/"), service


def test_every_version_delete_is_also_a_delete_for_minio():
    """MinIO checks s3:DeleteObject for a versioned delete (s3:DeleteObjectVersion only as a deny);
    AWS checks s3:DeleteObjectVersion. A policy with one without the other works on one store only."""
    for service in STORE_USERS:
        for statement in _policy(service)["Statement"]:
            actions = set(statement["Action"])
            assert ("s3:DeleteObject" in actions) == ("s3:DeleteObjectVersion" in actions), (
                service,
                statement["Sid"],
            )


def test_the_runbook_lists_every_identity():
    runbook = (REPO_ROOT / "docs" / "operations.md").read_text()
    section = runbook.split("### Object-store identities", 1)[1].split("\n### ", 1)[0]
    for service in STORE_USERS:
        assert f"| {service} |" in section, service


def _objects_granted(service: str) -> dict[str, set[str]]:
    """Object resource ARN -> the actions granted on it."""
    granted: dict[str, set[str]] = {}
    for action, resource in _grants(service):
        if "/" in resource.split(":::", 1)[1]:
            granted.setdefault(resource, set()).add(action)
    return granted


@pytest.mark.parametrize("service", STORE_USERS)
def test_what_aws_checks_and_minio_does_not_is_granted_too(service):
    """MinIO's checks are not AWS's, so the integration suite on MinIO cannot prove these: a read of a
    given version needs s3:GetObjectVersion; HEAD of a missing key answers 404 (not 403, which the
    services would take for a refusal) only with s3:ListBucket on the bucket; whoever writes must be
    able to abort the multipart upload boto3 starts above 8 MiB (or its parts stay, unlisted); an
    Object Lock write with a retention needs s3:PutObjectRetention."""
    grants = _grants(service)
    for resource, actions in _objects_granted(service).items():
        bucket = resource.split(":::", 1)[1].split("/", 1)[0]
        if "s3:GetObject" in actions:
            assert "s3:GetObjectVersion" in actions, resource
            assert ("s3:ListBucket", f"arn:aws:s3:::{bucket}") in grants, resource
        if "s3:PutObject" in actions:
            assert "s3:AbortMultipartUpload" in actions, resource
            if bucket == "enclave-audit-worm":
                assert "s3:PutObjectRetention" in actions, resource


def test_deploy_k8s_never_lets_a_service_create_its_buckets():
    for service in STORE_USERS:
        assert _k8s_env(service)["ENCLAVE_S3_CREATE_BUCKETS"] == "false", service
