"""Development keys, Kafka topics and the dev environment file (idempotent: existing keys are kept).

Everything goes under the state folder given as argument, never in the repo; `scripts/services.sh`
sources ``dev.env`` so the services find their keys. Production reads the same variables from
Kubernetes Secrets (deploy/k8s) and uses AWS KMS instead of keyring files.

On the local MinIO (the root user's credentials in effect) it also gives each service that touches the
object store its own MinIO user, bound to its policy in ``deploy/iam/`` (the same documents production
gives the services' IAM roles), and writes that user's keys to ``s3/<service>.env``; `scripts/services.sh`
starts each service with them, so the local stack and the integration tests run with the least
privilege production has. ``dev.env`` keeps the root user, for tests and admin commands that inspect
every bucket.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from enclave_common import topics
from enclave_common.crypto import LocalKeyring, generate_ingest_keypair, private_key_to_pem, public_key_to_pem

PARTITIONS = 3
#: The services with an object-store identity (the gateway has none) and their policies.
IAM_DIR = Path(__file__).resolve().parent.parent / "deploy" / "iam"
S3_SERVICES = ("ingest", "deid", "analysis", "audit")


def _write_secret(path: Path, data: bytes) -> None:
    if path.exists():
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def make_keys(keys: Path) -> dict[str, str]:
    keys.mkdir(parents=True, exist_ok=True)
    os.chmod(keys, 0o700)
    private = keys / "ingest-private.pem"
    if not private.exists():
        pair = generate_ingest_keypair()
        _write_secret(private, private_key_to_pem(pair))
        (keys / "ingest-public.pem").write_bytes(public_key_to_pem(pair.public_key()))
    for name in ("ingest-keyring.json", "deid-keyring.json"):
        if not (keys / name).exists():
            LocalKeyring.generate(name.removesuffix("-keyring.json") + "-kek").save(keys / name)
    for name in ("pseudonym.key", "deid-pseudonym.key"):
        _write_secret(keys / name, base64.b64encode(secrets.token_bytes(32)))
    _write_secret(
        keys / "audit-signing.pem",
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return {
        "ENCLAVE_PSEUDONYM_KEY": (keys / "pseudonym.key").read_text().strip(),
        "ENCLAVE_DEID_PSEUDONYM_KEY": (keys / "deid-pseudonym.key").read_text().strip(),
        "ENCLAVE_GATEWAY_INGEST_PUBLIC_KEY_FILE": str(keys / "ingest-public.pem"),
        "ENCLAVE_INGEST_PRIVATE_KEY_FILE": str(private),
        "ENCLAVE_INGEST_KEYRING_FILE": str(keys / "ingest-keyring.json"),
        "ENCLAVE_DEID_ORIGINALS_KEYRING_FILE": str(keys / "ingest-keyring.json"),
        "ENCLAVE_DEID_KEYRING_FILE": str(keys / "deid-keyring.json"),
        "ENCLAVE_ANALYSIS_KEYRING_FILE": str(keys / "deid-keyring.json"),
        "ENCLAVE_AUDIT_SIGNING_KEY_FILE": str(keys / "audit-signing.pem"),
    }


async def make_topics(bootstrap: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [t for topic in topics.ALL_TOPICS for t in (topic, topics.dlq(topic)) if t not in existing]
        if wanted:
            try:
                await admin.create_topics(
                    [NewTopic(name, num_partitions=PARTITIONS, replication_factor=1) for name in wanted]
                )
            except TopicAlreadyExistsError:
                pass
        return len(wanted)
    finally:
        await admin.close()


def main(state: Path) -> None:
    env = make_keys(state / "keys")
    env["ENCLAVE_STATE_DIR"] = str(state)
    # Connection settings of the local stack, so admin CLIs run with `set -a; . .state/dev.env`.
    for name in (
        "ENCLAVE_KAFKA_BOOTSTRAP_SERVERS",
        "ENCLAVE_MONGO_URL",
        "ENCLAVE_S3_ENDPOINT_URL",
        "ENCLAVE_S3_ACCESS_KEY_ID",
        "ENCLAVE_S3_SECRET_ACCESS_KEY",
    ):
        if os.environ.get(name):
            env[name] = os.environ[name]
    dev_issuer = Path(__file__).with_name("dev_issuer.py")
    if dev_issuer.exists():
        env.update(_dev_issuer_env(dev_issuer, state / "keys"))
    (state / "dev.env").write_text("".join(f"export {k}='{v}'\n" for k, v in sorted(env.items())))
    os.chmod(state / "dev.env", 0o600)
    bootstrap = os.environ.get(
        "ENCLAVE_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:" + os.environ.get("ENCLAVE_KAFKA_PORT", "19092")
    )
    created = asyncio.run(make_topics(bootstrap))
    print(f"[dev-setup] keys and dev.env under {state}; {created} Kafka topics created", file=sys.stderr)
    if _local_minio_as_root():
        make_buckets()
        make_s3_identities(state / "s3")
        print(
            f"[dev-setup] buckets, and MinIO users {', '.join(S3_SERVICES)} with deploy/iam policies",
            file=sys.stderr,
        )


def _local_minio_as_root() -> bool:
    """The S3 settings in effect are the local stack's MinIO with its root user (not an external
    store the caller exported: README, "Pointing Enclave at external Kafka, S3 and MongoDB")."""
    return bool(os.environ.get("ENCLAVE_LOCAL_MINIO_ROOT_USER")) and (
        os.environ.get("ENCLAVE_S3_ACCESS_KEY_ID") == os.environ["ENCLAVE_LOCAL_MINIO_ROOT_USER"]
        and os.environ.get("ENCLAVE_S3_ENDPOINT_URL") == os.environ.get("ENCLAVE_LOCAL_MINIO_ENDPOINT")
    )


def make_buckets() -> None:
    """The buckets, as the platform provisions them in production (versioned, encrypted by default,
    the audit bucket with Object Lock), by the services' own check with the root user: the services'
    policies may read a bucket's configuration, not create or change it."""
    from enclave_analysis.config import AnalysisSettings
    from enclave_audit.config import AuditSettings
    from enclave_common.settings import BaseServiceSettings
    from enclave_common.storage import S3ObjectStore
    from enclave_deid.config import DeidSettings
    from enclave_ingest.config import IngestSettings

    store = S3ObjectStore(BaseServiceSettings(s3_create_buckets=True))
    for settings, field in (
        (IngestSettings, "originals_bucket"),
        (DeidSettings, "deidentified_bucket"),
        (AnalysisSettings, "results_bucket"),
        (AuditSettings, "worm_bucket"),
    ):
        bucket = settings.model_fields[field].default
        _retrying(partial(_ensure_bucket, store, bucket, object_lock=field == "worm_bucket"))


def _ensure_bucket(store: Any, bucket: str, *, object_lock: bool) -> None:
    asyncio.run(store.ensure_bucket(bucket, object_lock=object_lock))


def _retrying(call: Callable[[], Any]) -> Any:
    """MinIO answers ready before its IAM and bucket metadata have loaded (minio/minio#11862): its
    "not initialized" answers are retried for up to a minute."""
    for attempt in range(30):
        try:
            return call()
        except Exception as exc:
            text = f"{getattr(exc, 'code', '')} {exc}"
            if attempt == 29 or not any(sign in text for sign in ("ServerNotInitialized", "Status: 503")):
                raise
            time.sleep(2)
    return None


def make_s3_identities(folder: Path) -> None:
    """One MinIO user per service, bound to ``deploy/iam/enclave-<service>.json`` (re-read each time, so
    a changed policy takes effect at the next ``make up``); keys in ``folder/<service>.env`` (0600),
    generated once."""
    from urllib.parse import urlsplit

    from minio.credentials import StaticProvider
    from minio.error import MinioAdminException
    from minio.minioadmin import MinioAdmin

    endpoint = urlsplit(os.environ["ENCLAVE_S3_ENDPOINT_URL"])
    admin = MinioAdmin(
        endpoint=endpoint.netloc,
        credentials=StaticProvider(
            os.environ["ENCLAVE_S3_ACCESS_KEY_ID"], os.environ["ENCLAVE_S3_SECRET_ACCESS_KEY"]
        ),
        secure=endpoint.scheme == "https",
    )
    folder.mkdir(exist_ok=True)
    os.chmod(folder, 0o700)
    for service in S3_SERVICES:
        user = f"enclave-{service}"
        env_file = folder / f"{service}.env"
        # token_hex: nothing in it a shell or MinIO would read as anything but the secret
        _write_secret(
            env_file,
            f"export ENCLAVE_S3_ACCESS_KEY_ID='{user}'\n"
            f"export ENCLAVE_S3_SECRET_ACCESS_KEY='{secrets.token_hex(24)}'\n".encode(),
        )
        secret = _env_value(env_file, "ENCLAVE_S3_SECRET_ACCESS_KEY")
        _retrying(partial(admin.policy_add, user, policy_file=IAM_DIR / f"{user}.json"))
        _retrying(partial(admin.user_add, user, secret))
        try:
            _retrying(partial(admin.attach_policy, [user], user=user))
        except MinioAdminException as exc:
            if "XMinioAdminPolicyChangeAlreadyApplied" not in str(exc):
                raise


def _env_value(path: Path, name: str) -> str:
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        if key == name:
            return value.strip("'")
    raise SystemExit(f"{path} has no {name}: delete it and run `make up` again")


def _dev_issuer_env(script: Path, keys: Path) -> dict[str, str]:
    """The dev OIDC issuer's keys (JWKS) for the gateway and audit APIs."""
    import subprocess

    if not (keys / "jwks.json").exists():
        subprocess.run(
            [sys.executable, str(script), "init", "--dir", str(keys)], check=True, capture_output=True
        )
    return {"ENCLAVE_OIDC_JWKS_FILE": str(keys / "jwks.json")}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
