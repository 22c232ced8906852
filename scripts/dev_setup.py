"""Development keys, Kafka topics and the dev environment file (idempotent: existing keys are kept).

Everything goes under the state folder given as argument, never in the repo; `scripts/services.sh`
sources ``dev.env`` so the services find their keys. Production reads the same variables from
Kubernetes Secrets (deploy/k8s) and uses AWS KMS instead of keyring files.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import sys
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from enclave_common import topics
from enclave_common.crypto import LocalKeyring, generate_ingest_keypair, private_key_to_pem, public_key_to_pem

PARTITIONS = 3


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
