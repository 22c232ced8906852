"""Each service starts with the configuration the prod manifests give it.

The manifests are checked against Kubernetes' schemas elsewhere; this checks them against the
services themselves: for every Deployment of the rendered prod overlay, the container's environment
(ConfigMap and Secret references) and its mounted Secret files are reproduced (Secrets filled with
freshly generated keys of the right kind, since their values are never in git), and the service's
own ``--check-config`` must accept them: settings parse, key files load, every key-encryption key and
the token keys are configured, the tracing exporter is installed. No network I/O.

Until the tenth session no test did this, and the prod overlay could not have started a single
service: the OTLP exporter it selects was not installed (all five crashed at start), the gateway and
ingest had no pseudonym key, ingest's sealing key was under an environment name it does not read,
deid had no key for the originals, analysis no key at all, and the auditor API no token keys (every
auditor query would have answered 503 while the pod looked ready).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from enclave_analysis.config import AnalysisSettings
from enclave_audit.config import AuditSettings
from enclave_common.crypto import LocalKeyring, generate_ingest_keypair, private_key_to_pem, public_key_to_pem
from enclave_common.settings import BaseServiceSettings
from enclave_deid.config import DeidSettings
from enclave_gateway.config import GatewaySettings
from enclave_ingest.config import IngestSettings

from .conftest import OVERLAYS, REPO_ROOT, SERVICES, config_of

SETTINGS: dict[str, type[BaseServiceSettings]] = {
    "gateway": GatewaySettings,
    "ingest": IngestSettings,
    "deid": DeidSettings,
    "analysis": AnalysisSettings,
    "audit": AuditSettings,
}


def _x25519_private() -> bytes:
    return private_key_to_pem(generate_ingest_keypair())


def _x25519_public() -> bytes:
    return public_key_to_pem(generate_ingest_keypair().public_key())


def _ed25519_private() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _hmac_key() -> bytes:
    return base64.b64encode(secrets.token_bytes(32))


@functools.cache
def _kafka_tls() -> dict[str, bytes]:
    """A cluster CA and a user certificate signed by it, as Strimzi writes them for a KafkaUser."""
    now = datetime.now(UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: Any) -> bytes:
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=subject == issuer, path_length=None), critical=True)
            .sign(signer, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    user_key = ec.generate_private_key(ec.SECP256R1())
    return {
        "ca.crt": certificate("cluster-ca", ca_key, "cluster-ca", ca_key),
        "user.crt": certificate("enclave-user", user_key, "cluster-ca", ca_key),
        "user.key": user_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    }


#: What each Secret key holds (docs/operations.md, "Create the secrets"), generated afresh.
SECRET_VALUES: dict[str, Callable[[], bytes]] = {
    "url": lambda: b"mongodb://mongo-0.mongodb.svc:27017/?tls=true&replicaSet=rs0",
    "access-key-id": lambda: b"AKIAENCLAVEDEPLOYTEST",
    "secret-access-key": lambda: base64.b64encode(secrets.token_bytes(30)),
    "key": _hmac_key,
    "hmac.key": _hmac_key,
    "public.pem": _x25519_public,
    "private.pem": _x25519_private,
    "ed25519.pem": _ed25519_private,
    "ca.crt": lambda: _kafka_tls()["ca.crt"],
    "user.crt": lambda: _kafka_tls()["user.crt"],
    "user.key": lambda: _kafka_tls()["user.key"],
    # The dev overlay's local keyrings (ingest's and deid's), in place of AWS KMS.
    "keyring.json": lambda: LocalKeyring.generate("dev-kek").to_json().encode(),
}


def _value(secret: str, key: str) -> bytes:
    if key not in SECRET_VALUES:
        pytest.fail(f"Secret {secret} key {key}: add what it holds to SECRET_VALUES (and docs/operations.md)")
    return SECRET_VALUES[key]()


def _container_environment(
    deployment: dict[str, Any], config_maps: dict[str, dict[str, str]], files: Path
) -> dict[str, str]:
    """The environment the container would get; Secret volumes become files under ``files``."""
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = _value(ref["name"], ref["key"]).decode()
        else:
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = config_maps[ref["name"]][ref["key"]]
    secret_volumes = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    moved: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        secret = secret_volumes.get(mount["name"])
        if secret is None:
            continue
        target = files / mount["name"]
        target.mkdir()
        moved[mount["mountPath"]] = str(target)
        for name, value in env.items():
            if value.startswith(mount["mountPath"] + "/"):
                key = value.removeprefix(mount["mountPath"] + "/")
                (target / key).write_bytes(_value(secret, key))
    for name, value in list(env.items()):
        for mount_path, target in moved.items():
            if value.startswith(mount_path + "/"):
                env[name] = target + value.removeprefix(mount_path)
    return env


def _check_config(
    service: str, env: dict[str, str], *, start: bool = False
) -> subprocess.CompletedProcess[str]:
    """``enclave-<service> --check-config`` (or, with ``start``, a plain start) with ``env`` only."""
    base = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    return subprocess.run(
        [str(REPO_ROOT / ".venv" / "bin" / f"enclave-{service}"), *([] if start else ["--check-config"])],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _read_settings(service: str) -> set[str]:
    """The ``ENCLAVE_*`` variables ``service`` reads: each setting under the service's prefix and
    under the shared ``ENCLAVE_`` one (``BaseServiceSettings.settings_customise_sources``)."""
    settings = SETTINGS[service]
    prefix = settings.model_config.get("env_prefix") or ""
    return {f"{p}{name.upper()}" for name in settings.model_fields for p in (prefix, "ENCLAVE_")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_enclave_setting_of_the_manifests_is_one_the_service_reads(overlay, documents, lint, tmp_path):
    """Settings are ``extra="ignore"``: a variable no service reads is silently dropped, so a
    manifest that sets one says something the service does not do. ``KEK_PROVIDER`` (``local`` in
    dev, ``aws-kms`` in the base) was one: KMS_KEY_ID or KEYRING_FILE choose the key provider."""
    docs = documents[overlay]
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in lint.of_kind(docs, "ConfigMap")}
    for deployment in lint.of_kind(docs, "Deployment"):
        service = deployment["metadata"]["name"].removeprefix("enclave-")
        files = tmp_path / overlay / service
        files.mkdir(parents=True)
        env = _container_environment(deployment, config_maps, files)
        unread = sorted(
            name for name in env if name.startswith("ENCLAVE_") and name not in _read_settings(service)
        )
        assert unread == [], f"{overlay} {service}: no setting reads {unread}"


def test_dev_services_hold_keyring_files_not_kms_keys(documents, lint):
    """The dev overlay has no AWS role (IRSA) on its service accounts, so no service there may name a
    KMS key: a key id wins over a keyring file (``enclave_common.keys_config.kek_provider``). Until
    now dev kept the base's KMS key ids and named its keyring in a setting nothing reads."""
    docs = documents["dev"]
    roles = {
        sa["metadata"]["name"]
        for sa in lint.of_kind(docs, "ServiceAccount")
        if "eks.amazonaws.com/role-arn" in sa["metadata"].get("annotations", {})
    }
    assert roles == set()
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in lint.of_kind(docs, "ConfigMap")}
    keyrings = {}
    for deployment in lint.of_kind(docs, "Deployment"):
        (source,) = deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        config = config_maps[source["configMapRef"]["name"]]
        assert not [name for name in config if name.endswith("KMS_KEY_ID")], deployment["metadata"]["name"]
        keyrings[deployment["metadata"]["name"]] = {k for k in config if k.endswith("KEYRING_FILE")}
    assert keyrings == {
        "enclave-gateway": set(),
        "enclave-ingest": {"ENCLAVE_INGEST_KEYRING_FILE"},
        "enclave-deid": {"ENCLAVE_DEID_KEYRING_FILE", "ENCLAVE_DEID_ORIGINALS_KEYRING_FILE"},
        "enclave-analysis": {"ENCLAVE_ANALYSIS_KEYRING_FILE"},
        "enclave-audit": set(),
    }


@pytest.mark.parametrize("service", ["ingest", "deid", "analysis"])
def test_each_key_holding_service_accepts_the_configuration_of_its_dev_manifests(
    service, documents, lint, tmp_path
):
    """The keyring files the dev overlay mounts load (``--check-config`` opens them)."""
    docs = documents["dev"]
    deployments = {d["metadata"]["name"]: d for d in lint.of_kind(docs, "Deployment")}
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in lint.of_kind(docs, "ConfigMap")}
    env = _container_environment(deployments[f"enclave-{service}"], config_maps, tmp_path)
    assert env.get("ENCLAVE_ENVIRONMENT") == "dev"
    result = _check_config(service, env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"service": service, "configuration": "ok"}


@pytest.fixture(scope="module")
def prod(documents, lint) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    docs = documents["prod"]
    deployments = {d["metadata"]["name"]: d for d in lint.of_kind(docs, "Deployment")}
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in lint.of_kind(docs, "ConfigMap")}
    return deployments, config_maps


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_each_service_accepts_the_configuration_of_its_prod_manifests(service, prod, tmp_path):
    deployments, config_maps = prod
    env = _container_environment(deployments[f"enclave-{service}"], config_maps, tmp_path)
    assert env.get("ENCLAVE_ENVIRONMENT") == "prod"
    result = _check_config(service, env)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"service": service, "configuration": "ok"}


def test_the_check_fails_and_names_the_setting_when_a_key_is_missing(prod, tmp_path):
    """The check can fail: ingest without its sealing key (the env name the manifests once used
    instead of the one ingest reads)."""
    deployments, config_maps = prod
    env = _container_environment(deployments["enclave-ingest"], config_maps, tmp_path)
    env["ENCLAVE_INGEST_SEALING_PRIVATE_KEY_FILE"] = env.pop("ENCLAVE_INGEST_PRIVATE_KEY_FILE")
    result = _check_config("ingest", env)
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    verdict = json.loads(result.stdout.strip().splitlines()[-1])
    assert verdict["configuration"] == "invalid"
    assert "ENCLAVE_INGEST_PRIVATE_KEY_FILE" in verdict["reason"]

    # A plain start checks first too: the same line, exit 2, before anything listens.
    started = _check_config("ingest", env, start=True)
    assert started.returncode == 2, started.stdout + started.stderr[-3000:]
    assert json.loads(started.stdout.strip().splitlines()[-1]) == verdict


def test_a_setting_that_does_not_parse_gets_the_same_verdict_without_its_value(prod, tmp_path):
    deployments, config_maps = prod
    env = _container_environment(deployments["enclave-gateway"], config_maps, tmp_path)
    env["ENCLAVE_GATEWAY_SPOOL_DISK_BYTES"] = "lots-of-bytes"
    result = _check_config("gateway", env)
    assert result.returncode == 2, result.stdout + result.stderr[-3000:]
    verdict = json.loads(result.stdout.strip().splitlines()[-1])
    assert verdict["configuration"] == "invalid"
    assert verdict["reason"].startswith("ENCLAVE_GATEWAY_SPOOL_DISK_BYTES: ")
    assert "lots-of-bytes" not in result.stdout + result.stderr


def _settings_of(service: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The service's settings object as its container would build it from ``env`` alone."""
    settings_class = {"gateway": GatewaySettings, "deid": DeidSettings}[service]
    with monkeypatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("ENCLAVE_")]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return settings_class()


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_the_gateway_acknowledges_no_instance_that_deid_would_quarantine_for_its_size(
    overlay, documents, lint, tmp_path, monkeypatch
):
    """An instance above deid's limit would be acknowledged, stored, then quarantined
    (``instance_too_large``): the hospital would learn it only from the status. The gateway's
    limit must be at most deid's, so it is refused at upload with the allowed size instead."""
    docs = documents[overlay]
    deployments = {d["metadata"]["name"]: d for d in lint.of_kind(docs, "Deployment")}
    config_maps = {c["metadata"]["name"]: c.get("data", {}) for c in lint.of_kind(docs, "ConfigMap")}
    limits = {}
    for service in ("gateway", "deid"):
        files = tmp_path / service
        files.mkdir()
        env = _container_environment(deployments[f"enclave-{service}"], config_maps, files)
        limits[service] = _settings_of(service, env, monkeypatch).max_instance_bytes
    assert 0 < limits["gateway"] <= limits["deid"], limits

    # The check can fail: a gateway configured past deid's limit.
    (tmp_path / "past").mkdir()
    env = _container_environment(deployments["enclave-gateway"], config_maps, tmp_path / "past")
    env["ENCLAVE_GATEWAY_MAX_INSTANCE_BYTES"] = str(limits["deid"] + 1)
    assert _settings_of("gateway", env, monkeypatch).max_instance_bytes > limits["deid"]


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_audit_indexes_are_created_by_an_init_container_under_the_migration_user(overlay, documents, lint):
    """The audit service runs under an append-only MongoDB role that cannot create indexes
    (docs/audit.md): it only checks them, and `enclave-audit-migrate` creates them first, with a
    credential its own container never holds."""
    docs = documents[overlay]
    [audit] = [d for d in lint.of_kind(docs, "Deployment") if d["metadata"]["name"] == "enclave-audit"]
    pod = audit["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    [service] = pod["containers"]
    assert init["command"] == ["enclave-audit-migrate"]
    assert init["image"] == service["image"] and init["envFrom"] == service["envFrom"]
    [url] = [e for e in init["env"] if e["name"] == "ENCLAVE_AUDIT_MONGO_URL"]
    assert url["valueFrom"]["secretKeyRef"]["name"] == "enclave-audit-mongo-migrate"
    assert "mongo-migrate" not in json.dumps(service)
    assert config_of(docs, "enclave-audit")["ENCLAVE_AUDIT_CREATE_INDEXES"] == "false"
    scripts = (REPO_ROOT / "services" / "audit" / "pyproject.toml").read_text()
    assert 'enclave-audit-migrate = "enclave_audit.migrate:main"' in scripts
