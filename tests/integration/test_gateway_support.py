"""Shared helpers of the gateway integration tests (this module holds no tests).

Tokens come from the dev issuer's keys in .state/keys; a second gateway process with its own
settings (small limits, TLS, its own JWKS file) is started on a free port with the same environment
`scripts/services.sh` gives the real one; topics are watched from the offsets they had when a test
began, so a check reads only what that test caused.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from enclave_common.auth.dev_issuer import DevIssuer
from enclave_common.envelope import Envelope
from enclave_common.pseudonyms import pseudonymizer_from_base64

from .conftest import KAFKA, MONGO_URL, S3_ENDPOINT
from .support import ROOT, STATE, dev_env, mr_instance

sys.path.insert(0, str(ROOT / "services" / "gateway" / "tests"))

from corpus import builders  # noqa: E402

GATEWAY = os.environ.get("ENCLAVE_IT_GATEWAY_URL", "http://127.0.0.1:8080")
__all__ = ["GATEWAY", "builders"]


def issuer() -> DevIssuer:
    return DevIssuer.load(STATE / "keys")


def new_tenant(prefix: str = "it-gw") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def bearer(subject: str, tenant: str, *roles: str, ttl: int = 900, **kwargs: Any) -> dict[str, str]:
    token = issuer().mint(subject=subject, tenant=tenant, roles=list(roles), ttl_seconds=ttl, **kwargs)
    return {"Authorization": f"Bearer {token}"}


async def form_upload(
    client: httpx.AsyncClient, headers: Mapping[str, str], patient_id: str
) -> httpx.Response:
    """``POST /api/v1/imaging/upload`` of one MR instance of ``patient_id`` (``client`` based at the
    gateway), as ``headers``' principal."""
    data, _ = mr_instance(patient_id=patient_id)
    return await client.post(
        "/api/v1/imaging/upload", files=[("file", ("x.dcm", data, "application/dicom"))], headers=headers
    )


def patient_key(tenant: str, patient_id: str) -> str:
    """The pseudonym the gateway stores for a patient (same HMAC key as the running services)."""
    return pseudonymizer_from_base64(dev_env()["ENCLAVE_PSEUDONYM_KEY"], "ENCLAVE_PSEUDONYM_KEY").pseudonym(
        tenant, "patient", patient_id
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """The environment `scripts/services.sh` gives a service, plus ``overrides``."""
    env = {
        **os.environ,
        "ENCLAVE_ENVIRONMENT": "dev",
        "ENCLAVE_KAFKA_BOOTSTRAP_SERVERS": KAFKA,
        "ENCLAVE_MONGO_URL": MONGO_URL,
        "ENCLAVE_S3_ENDPOINT_URL": S3_ENDPOINT,
        "ENCLAVE_STATE_DIR": str(STATE),
        **dev_env(),
    }
    env.update(overrides)
    return env


class GatewayProcess:
    """A second gateway (``enclave-gateway``) started by a test, with its own port, database, consumer
    group and spool directory; stopped by its pid."""

    def __init__(self, tmp: Path, overrides: Mapping[str, str], *, tls: bool = False) -> None:
        self.port = free_port()
        self.scheme = "https" if tls else "http"
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        self.log_path = tmp / f"gateway-{self.port}.log"
        spool = tmp / f"spool-{self.port}"
        self.env = service_env(
            {
                "ENCLAVE_GATEWAY_HTTP_PORT": str(self.port),
                "ENCLAVE_GATEWAY_SERVICE_NAME": "gateway_it",
                "ENCLAVE_GATEWAY_SPOOL_DIR": str(spool),
                "ENCLAVE_GATEWAY_PUBLIC_BASE_URL": self.url,
                "ENCLAVE_TRACING_EXPORTER": "none",
                **overrides,
            }
        )
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> GatewayProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - our own entry point
            [str(ROOT / ".venv" / "bin" / "enclave-gateway")],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"test gateway exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", verify=False, timeout=2).status_code == 200:  # noqa: S501
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"test gateway not ready in {timeout}s: {self.log_path.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@contextmanager
def gateway_process(
    tmp: Path, overrides: Mapping[str, str], *, tls: bool = False
) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(tmp, overrides, tls=tls).start()
    try:
        yield gateway
    finally:
        gateway.stop()


class TopicWatch:
    """Remembers where topics ended when created; :meth:`read` returns what was appended since."""

    def __init__(self, *topics: str) -> None:
        self.topics = topics
        self.start: dict[TopicPartition, int] = {}

    async def __aenter__(self) -> TopicWatch:
        consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False)
        await consumer.start()
        try:
            for topic in self.topics:
                partitions = consumer.partitions_for_topic(topic)
                if partitions is None:
                    await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public way
                    partitions = consumer.partitions_for_topic(topic) or set()
                tps = [TopicPartition(topic, p) for p in partitions]
                self.start.update(await consumer.end_offsets(tps) if tps else {})
        finally:
            await consumer.stop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def read(
        self, predicate: Callable[[Envelope], bool] = lambda _: True, settle: float = 1.5
    ) -> list[Envelope]:
        """Every matching envelope appended since the watch began, up to the current end offsets."""
        if not self.start:
            return []
        consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA, enable_auto_commit=False)
        await consumer.start()
        out: list[Envelope] = []
        try:
            await asyncio.sleep(settle)
            consumer.assign(list(self.start))
            ends = await consumer.end_offsets(list(self.start))
            for tp, offset in self.start.items():
                consumer.seek(tp, offset)
            pending = {tp for tp in self.start if ends[tp] > self.start[tp]}
            while pending:
                batch = await consumer.getmany(*pending, timeout_ms=5000, max_records=2000)
                if not batch:
                    break
                for tp, records in batch.items():
                    for record in records:
                        if record.offset >= ends[tp]:
                            pending.discard(tp)
                            break
                        env = Envelope.from_bytes(record.value)
                        if predicate(env):
                            out.append(env)
                        if record.offset + 1 >= ends[tp]:
                            pending.discard(tp)
        finally:
            await consumer.stop()
        return out


async def wait_for_status(
    client: httpx.AsyncClient,
    url: str,
    headers: Mapping[str, str],
    wanted: set[str],
    *,
    timeout: float = 90.0,
) -> dict[str, Any]:
    """GET ``url`` until its ``status`` is one of ``wanted``; the last body."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = await client.get(url, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        if body.get("status") in wanted:
            return body
        await asyncio.sleep(0.5)
    raise AssertionError(f"status stayed {body.get('status')!r}, wanted one of {sorted(wanted)}")


async def wait_patient_statuses(
    client: httpx.AsyncClient,
    base: str,
    tenant: str,
    patient_id: str,
    count: int,
    wanted: set[str],
    timeout: float = 90.0,
) -> list[dict[str, Any]]:
    """Poll the patient query (as a clinician of ``tenant``) until ``count`` instances are in ``wanted``."""
    headers = bearer("it-clinician", tenant, "clinician")
    deadline = time.monotonic() + timeout
    instances: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        response = await client.get(f"{base}/api/v1/imaging/patient/{patient_id}", headers=headers)
        assert response.status_code == 200, response.text
        instances = response.json()["instances"]
        if len(instances) >= count and all(i["status"] in wanted for i in instances):
            return instances
        await asyncio.sleep(0.5)
    raise AssertionError(
        f"after {timeout}s: {[i['status'] for i in instances]} (wanted {count} in {sorted(wanted)})"
    )
