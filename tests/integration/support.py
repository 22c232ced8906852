"""Helpers for integration tests: dev keys, DICOM with planted PHI, Kafka event waiting."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import ipaddress
import os
import shlex
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
from aiokafka import AIOKafkaConsumer, TopicPartition
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from enclave_common.envelope import Envelope
from pydantic import ValidationError
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from .conftest import KAFKA, MONGO_URL

ROOT = Path(__file__).resolve().parents[2]
STATE = Path(os.environ.get("ENCLAVE_STATE", ROOT / ".state"))

#: Values planted in test instances; every output of a run is searched for them.
PHI = {
    "PatientName": "QUIXOTE^ALONSO^DE LA MANCHA",
    "PatientID": "PHI-MRN-77123-ZX",
    "PatientBirthDate": "19411103",
    "InstitutionName": "Hospital Rocinante Toboso",
    "ReferringPhysicianName": "PANZA^SANCHO",
    "AccessionNumber": "ACC-PHI-55821",
}


def dev_env() -> dict[str, str]:
    """The variables `scripts/dev-setup.sh` wrote (key file paths, pseudonym keys)."""
    return env_file(STATE / "dev.env")


def env_file(path: Path) -> dict[str, str]:
    """The ``export NAME='value'`` lines of a file `scripts/dev-setup.sh` wrote."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


def service_identity(service: str) -> dict[str, str]:
    """The service's own object-store keys on the local MinIO (``.state/s3/<service>.env``, bound to
    its deploy/iam policy by `make up`); none when the stack runs without them."""
    path = STATE / "s3" / f"{service}.env"
    return env_file(path) if path.exists() else {}


def mr_instance(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = PHI["PatientID"],
    source: str = "MR_small.dcm",
) -> tuple[bytes, pydicom.Dataset]:
    """pydicom's MR_small with planted PHI and fresh UIDs, as a Part 10 file."""
    ds = pydicom.dcmread(get_testdata_file(source))
    for name, value in PHI.items():
        setattr(ds, name, value)
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), ds


async def wait_for_events(
    topic: str | tuple[str, ...],
    predicate: Callable[[Envelope], bool],
    *,
    count: int = 1,
    timeout: float = 60.0,
) -> list[Envelope]:
    """Read ``topic`` (or each of several) from the beginning with a fresh group until ``count``
    envelopes match."""
    consumer = AIOKafkaConsumer(
        *((topic,) if isinstance(topic, str) else topic),
        bootstrap_servers=KAFKA,
        group_id=f"it-wait-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        metadata_max_age_ms=1000,
    )
    await consumer.start()
    found: list[Envelope] = []
    try:

        async def collect() -> None:
            async for record in consumer:
                env = Envelope.from_bytes(record.value)
                if predicate(env) and env.id not in {e.id for e in found}:
                    found.append(env)
                    if len(found) >= count:
                        return

        await asyncio.wait_for(collect(), timeout)
    finally:
        await consumer.stop()
    return found


async def read_all(topic: str, predicate: Callable[[Envelope], bool], settle: float = 2.0) -> list[Any]:
    """Every envelope on ``topic`` matching ``predicate`` (duplicates included; a record that is not an
    envelope matches nothing): the whole topic up to
    its end offsets at the call, then whatever arrives until it has been quiet for ``settle`` seconds.

    Partitions are assigned, not joined through a group: "nothing came within ``settle``" could
    otherwise mean "the group had not finished joining yet" on a busy machine, which would make an
    empty answer (and every assertion that nothing was published) meaningless."""
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False, metadata_max_age_ms=1000)
    await consumer.start()
    out: list[Envelope] = []
    try:
        partitions: set[int] = set()
        for _ in range(100):  # a topic created a moment ago may not be in the metadata yet
            await consumer.topics()  # refreshes the cluster metadata
            partitions = consumer.partitions_for_topic(topic) or set()
            if partitions:
                break
            await asyncio.sleep(0.1)
        if not partitions:
            raise AssertionError(f"topic {topic} does not exist")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=int(settle * 1000))
            for records in batch.values():
                for record in records:
                    try:
                        env = Envelope.from_bytes(record.value)
                    except ValidationError:  # a dead-letter topic also holds what was not an envelope
                        continue
                    if predicate(env):
                        out.append(env)
            if not batch and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                return out
    finally:
        await consumer.stop()


# ---- acting as the gateway on the bus (for tests that need chunk-level control) ----------------

import hashlib  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from aiokafka import AIOKafkaProducer  # noqa: E402
from enclave_common import topics  # noqa: E402
from enclave_common.crypto import InstanceSealer, SealContext, load_public_key  # noqa: E402
from enclave_common.envelope import new_event_id  # noqa: E402
from enclave_common.events import UploadChunk  # noqa: E402


def sealed_chunk_envelopes(
    data: bytes,
    *,
    tenant: str,
    upload_id: str,
    instance_upload_id: str | None = None,
    chunk_bytes: int = 4096,
) -> list[Envelope]:
    """The `upload.chunk` envelopes the gateway would publish for ``data``."""
    instance_upload_id = instance_upload_id or new_event_id()
    sealer = InstanceSealer(
        load_public_key(dev_env()["ENCLAVE_GATEWAY_INGEST_PUBLIC_KEY_FILE"]),
        SealContext(tenant, instance_upload_id),
        max_chunk_bytes=chunk_bytes,
    )
    pieces = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
    digest = hashlib.sha256(data).hexdigest()
    return [
        Envelope.for_topic(
            topics.UPLOAD_CHUNK,
            UploadChunk(
                upload_id=upload_id,
                instance_upload_id=instance_upload_id,
                index=i,
                count=len(pieces),
                sealed=bytes(sealer.seal_chunk(piece, final=i == len(pieces) - 1)),
                total_size=len(data),
                sha256=digest,
            ),
            source="gateway",
            tenant=tenant,
            actor="it-test",
            correlation_id=upload_id,
        )
        for i, piece in enumerate(pieces)
    ]


async def publish(topic: str, envelopes: list[Envelope], *, key: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for env in envelopes:
            await producer.send_and_wait(topic, env.to_bytes(), key=key.encode())
    finally:
        await producer.stop()


def kill_hard(component: str) -> None:
    """kill -9 one of our processes (its pid file stays, as after a crash)."""
    pid = int((STATE / "pids" / f"{component}.pid").read_text())
    os.killpg(pid, signal.SIGKILL)
    for _ in range(100):  # until it is gone (or a zombie: our reaper may be slow)
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            return
        if state == "Z":
            return
        time.sleep(0.1)


@contextlib.contextmanager
def paused(component: str) -> Iterator[None]:
    """SIGSTOP one of our processes for the block, SIGCONT after: a hung server (its port still
    accepts connections and requests, and nothing answers)."""
    pid = int((STATE / "pids" / f"{component}.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def restart(component: str) -> None:
    """Start a killed component again with the project's own scripts (waits for readiness)."""
    if component in ("kafka", "minio", "ferretdb"):
        subprocess.run([str(ROOT / "scripts/stack/up.sh"), component], check=True)
    else:
        subprocess.run([str(ROOT / "scripts/services.sh"), "up"], check=True)


@contextlib.contextmanager
def restarted_with(service: str, settings: dict[str, str]) -> Iterator[None]:
    """Run one of the services with extra ``settings`` (environment variables) for the block: killed
    and started again with them, then killed and started again as the stack configures it."""
    kill_hard(service)
    subprocess.run([str(ROOT / "scripts/services.sh"), "up"], check=True, env={**os.environ, **settings})
    try:
        yield
    finally:
        kill_hard(service)
        restart(service)


def admin_command(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one of the project's commands (``.venv/bin/<name>``) with the stack's environment, as an
    operator would in the service's pod (docs/operations.md): ``enclave-deid-redo`` with deid's
    object-store identity, and so on; output captured."""
    service = name.removeprefix("enclave-").split("-")[0]
    return subprocess.run(
        [str(ROOT / ".venv/bin" / name), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **dev_env(), **service_identity(service), "ENCLAVE_MONGO_URL": MONGO_URL},
        timeout=300,
    )


from enclave_common.events import AccessRecorded  # noqa: E402


def access_event(
    *,
    actor: str,
    tenant: str,
    action: str = "read_status",
    target: str | None = None,
    roles: list[str] | None = None,
    correlation_id: str | None = None,
    outcome: str = "success",
    status_code: int | None = None,
    detail: str | None = None,
) -> Envelope:
    """An ``access.recorded`` event as a service emits it (a test's own actor and tenant)."""
    data = AccessRecorded(
        actor=actor,
        roles=roles or ["uploader"],
        action=action,
        target=target,
        outcome=outcome,  # type: ignore[arg-type]
        status_code=status_code or (200 if outcome == "success" else 401),
        source_address="10.9.8.7",
        detail=detail,
    )
    return Envelope.for_topic(
        topics.ACCESS_RECORDED,
        data,
        source="it-audit",
        tenant=tenant,
        actor=actor,
        correlation_id=correlation_id or f"corr-{actor}",
    )


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 signed by its own key (its own trust anchor): ``cert.pem``
    and ``key.pem`` in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path
