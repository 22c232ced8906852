"""Benchmark: STOW-RS into the Enclave gateway vs Orthanc, same files, same client, same run.

200 MR instances of 256x256 16-bit (~128 KiB; pydicom's MR_small with resized pixel data and fresh
UIDs), posted one instance per STOW-RS request by 1 client and by 4 concurrent clients, after the same
untimed warm-up for every server. An "HTTP floor" is measured first (``bench/http_floor.py``: the
gateway's HTTP stack reading each body and answering, nothing else; ``--skip-floor``): it shows what
the client and the HTTP layer alone allow on this machine. The gateway is measured as one process and as two replicas sharing
the port (SO_REUSEPORT; ``--replicas``), and the server's own CPU time per instance is printed. The
gateway validates, seals and publishes every instance to Kafka (acks=all) before it answers; Orthanc
(Debian packages ``orthanc`` + ``orthanc-dicomweb``, started here on loopback with a temporary
configuration and storage directory, stopped after) stores to its local disk and SQLite index.
Both answer only once the instance is safe in their store. While they are measured, the stack's
ingest, deid, analysis and audit are paused (SIGSTOP, resumed after; ``--keep-downstream`` leaves
them running): on 2 cores they would take the CPU both servers need, and Orthanc has no pipeline
behind it. Kafka, MinIO and FerretDB keep running; the gateway's publishes are acknowledged by Kafka
as always, and the paused services consume the backlog afterwards. Before each measurement the bench
waits until Kafka, FerretDB and MinIO are quiet (a paused service's last queries can keep FerretDB
busy for seconds). Besides the server's own CPU time per instance it prints the stack's (what the
gateway's publishes and read-model writes cost Kafka and FerretDB) and the client's: on a 2-core
machine all three share the cores.

Then the peak RSS of a fresh gateway while it receives one 1 GiB STOW request (8 instances of
128 MiB, generated on the fly as a stream: the client never holds it either), sealed to a throwaway
key so that the shared stack's ingest refuses it cheaply instead of storing 1 GiB.

Usage (the stack must be up; `make bench-gateway` does that):
    python bench/gateway.py [--instances 200] [--replicas 1 2] [--skip-floor] [--skip-orthanc] [--skip-rss] [--keep-downstream]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from enclave_common.auth.dev_issuer import DevIssuer
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("ENCLAVE_STATE", ROOT / ".state"))
ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
#: The rows' server names the target compares.
ORTHANC_LABEL = "Orthanc"
GATEWAY_LABEL = "Enclave gateway"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MIB = 1024 * 1024
KAFKA = os.environ.get("ENCLAVE_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
BENCH_GATEWAY = "gateway_bench"
WARMUP_INSTANCES = 100
BOUNDARY = "enclave-bench-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary="{BOUNDARY}"'


# ---- data ----------------------------------------------------------------------------------------


def mr_instances(count: int) -> list[bytes]:
    """``count`` MR instances of 256x256 16-bit, one study and series, fresh UIDs."""
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    template.Rows = template.Columns = 256
    template.BitsAllocated, template.BitsStored, template.HighBit = 16, 16, 15
    pixels = bytes(range(256)) * (256 * 256 * 2 // 256)
    template.PixelData = pixels
    return numbered_copies(template, count)


def numbered_copies(template: pydicom.Dataset, count: int) -> list[bytes]:
    """``count`` Part 10 copies of ``template`` in one new study and series, each with its own UID."""
    template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
    out = []
    for number in range(count):
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = number + 1
        buffer = io.BytesIO()
        template.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


def stow_body(instance: bytes) -> bytes:
    """One instance as the Python dicomweb-client frames it."""
    return (
        f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + instance
        + f"\r\n--{BOUNDARY}--".encode()
    )


# ---- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 60.0, **kwargs: object) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2, **kwargs).status_code < 500:  # type: ignore[arg-type]
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@dataclass
class Server:
    name: str
    stow_url: str
    headers: Callable[[int], dict[str, str]]
    processes: list[subprocess.Popen[bytes]]

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.processes[0]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p.pid) for p in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def listening_sockets(port: int) -> int:
    """TCP sockets in LISTEN state on ``port`` (``/proc/net/tcp``): one per ready replica."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].rsplit(":", 1)[1] == f"{port:04X}" and fields[3] == "0A":
                count += 1
    return count


def start_orthanc(workdir: Path) -> Server:
    if not Path(ORTHANC).exists() or not DICOMWEB_PLUGIN.exists():
        raise SystemExit("Orthanc is not installed: run scripts/install-orthanc.sh (make bench-gateway does)")
    port = free_port()
    storage = workdir / "orthanc-storage"
    storage.mkdir()
    config = {
        "Name": "enclave-bench",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "HttpThreadsCount": 50,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("wb")
    process = subprocess.Popen([ORTHANC, str(config_path)], stdout=log, stderr=subprocess.STDOUT)
    server = Server(ORTHANC_LABEL, f"http://127.0.0.1:{port}/dicom-web/studies", lambda _: {}, [process])
    return ready_or_stopped(server, f"http://127.0.0.1:{port}/system")


def ready_or_stopped(server: Server, url: str) -> Server:
    """``server`` once ``url`` answers; stopped (and the error raised) if it never does."""
    try:
        wait_http(url)
    except RuntimeError:
        server.stop()
        raise
    return server


def start_floor(workdir: Path) -> Server:
    """The HTTP floor (``bench/http_floor.py``): reads each body and answers, nothing else."""
    port = free_port()
    log = (workdir / "http-floor.log").open("wb")
    process = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "bench" / "http_floor.py"), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    server = Server("HTTP floor", f"http://127.0.0.1:{port}/dicomweb/studies", lambda _: {}, [process])
    return ready_or_stopped(server, f"http://127.0.0.1:{port}/")


def start_gateway(workdir: Path, *, throwaway_ingest_key: bool = False, replicas: int = 1) -> Server:
    """A gateway of its own (no per-principal rate limit to trip over), on the running stack.

    With ``replicas`` > 1, that many gateway processes share the port (SO_REUSEPORT): the kernel
    spreads connections over them, as a Kubernetes Service spreads them over the gateway's pods
    (2 at least, `deploy/k8s`). One Python process uses one core.

    With ``throwaway_ingest_key`` it seals to a key nobody holds: the stack's ingest refuses such an
    instance when its first chunk does not open, instead of storing (and deid processing) it. The
    gateway's work is the same; used for the 1 GiB request, which would otherwise leave ingest a
    backlog of minutes that delays every other upload on the shared stack."""
    port = free_port()
    env = {**os.environ, **dev_env()}
    if throwaway_ingest_key:
        key_path = workdir / "throwaway-ingest-public.pem"
        key_path.write_bytes(
            X25519PrivateKey.generate()
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        env["ENCLAVE_GATEWAY_INGEST_PUBLIC_KEY_FILE"] = str(key_path)
        workdir = workdir / "large"
        workdir.mkdir(exist_ok=True)
    env.update(
        {
            "ENCLAVE_ENVIRONMENT": "dev",
            "ENCLAVE_GATEWAY_HTTP_PORT": str(port),
            "ENCLAVE_GATEWAY_HTTP_REUSE_PORT": "true" if replicas > 1 else "false",
            "ENCLAVE_GATEWAY_SERVICE_NAME": BENCH_GATEWAY,
            "ENCLAVE_GATEWAY_SPOOL_DIR": str(workdir / "spool"),
            "ENCLAVE_GATEWAY_RATE_LIMIT_BURST": "1000000",
            "ENCLAVE_GATEWAY_RATE_LIMIT_PER_SECOND": "1000000",
            "ENCLAVE_TRACING_EXPORTER": "none",
            "ENCLAVE_LOG_LEVEL": "WARNING",
        }
    )
    processes = []
    for replica in range(replicas):
        log = (workdir / f"gateway-{port}-{replica}.log").open("wb")
        processes.append(
            subprocess.Popen(
                [str(ROOT / ".venv" / "bin" / "enclave-gateway")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    issuer = DevIssuer.load(STATE / "keys")
    tenant = f"bench-{uuid.uuid4().hex[:8]}"

    def headers(client: int) -> dict[str, str]:
        token = issuer.mint(
            subject=f"bench-client-{client}", tenant=tenant, roles=["uploader"], ttl_seconds=3600
        )
        return {"Authorization": f"Bearer {token}"}

    name = GATEWAY_LABEL if replicas == 1 else f"{GATEWAY_LABEL} x{replicas}"
    server = Server(name, f"http://127.0.0.1:{port}/dicomweb/studies", headers, processes)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in processes):
                raise RuntimeError("a bench gateway exited; see its log in " + str(workdir))
            # A replica listens only once its startup is complete, so all listening = all ready.
            if listening_sockets(port) >= replicas:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        return server
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        raise RuntimeError("the bench gateway did not become ready")
    except BaseException:
        server.stop()
        raise


def stack_pid(name: str) -> int | None:
    """The pid ``make up`` recorded for one of the stack's processes or services, if any."""
    try:
        return int((STATE / "pids" / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None


#: The stack's services that consume what a benchmark publishes.
DOWNSTREAM = ("ingest", "deid", "analysis", "audit")


@contextmanager
def paused(names: tuple[str, ...]) -> Iterator[list[str]]:
    """SIGSTOP the stack's services ``names`` (those running) for the block, SIGCONT after; yields
    the names paused. On 2 cores they would otherwise take the CPU the measured server needs."""
    pids = [(name, pid) for name in names if (pid := stack_pid(name)) is not None]
    stopped: list[tuple[str, int]] = []
    try:
        for name, pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
                stopped.append((name, pid))
            except ProcessLookupError:
                continue
        yield [name for name, _ in stopped]
    finally:
        for _, pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass


def dev_env() -> dict[str, str]:
    import shlex

    env: dict[str, str] = {}
    for line in (STATE / "dev.env").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


async def group_lag(group: str) -> int:
    """Messages the consumer group ``group`` has yet to consume, over the topics it has offsets for."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        ends = await consumer.end_offsets(list(committed))
        return sum(max(0, ends[tp] - meta.offset) for tp, meta in committed.items() if meta.offset >= 0)
    finally:
        await consumer.stop()
        await admin.close()


#: The stack's own processes: they keep running while a server is measured.
STACK = ("kafka", "ferretdb", "minio")


def stack_cpu_seconds() -> float:
    total = 0.0
    for pid in filter(None, map(stack_pid, STACK)):
        with contextlib.suppress(OSError):  # gone since its pid file was written
            total += cpu_seconds(pid)
    return total


def wait_quiet(threshold: float = 0.10, timeout: float = 120.0) -> float:
    """Wait until Kafka, FerretDB and MinIO together use less than ``threshold`` of one core over a
    second: a paused service's last queries keep FerretDB busy for a while (its scans take seconds),
    and that CPU would be taken from whichever server is measured next. Returns the last load (CPU
    seconds per second), which the stack's CPU per instance is corrected by."""
    deadline = time.monotonic() + timeout
    while True:
        before = stack_cpu_seconds()
        time.sleep(1.0)
        load = stack_cpu_seconds() - before
        if load < threshold or time.monotonic() > deadline:
            return load


def wait_caught_up(group: str, timeout: float = 300.0) -> None:
    """Wait until the gateway's read model consumed the backlog earlier runs left it (events of
    instances the downstream services processed since), so the measurement is of uploads alone."""
    deadline = time.monotonic() + timeout
    while (lag := asyncio.run(group_lag(group))) > 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{group} still has {lag} events to consume after {timeout:.0f} s")
        time.sleep(1)


# ---- the client ----------------------------------------------------------------------------------


async def post_all(server: Server, instances: list[bytes], clients: int) -> float:
    """Post every instance (one STOW request each) from ``clients`` concurrent clients; seconds taken."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for instance in instances:
        queue.put_nowait(instance)

    async def client(number: int) -> None:
        headers = {**server.headers(number), "Content-Type": CONTENT_TYPE, "Accept": "application/dicom+json"}
        async with httpx.AsyncClient(timeout=120) as http:
            while not queue.empty():
                instance = queue.get_nowait()
                answer = await http.post(server.stow_url, content=stow_body(instance), headers=headers)
                if answer.status_code != 200:
                    raise RuntimeError(f"{server.name} answered {answer.status_code}: {answer.text[:300]}")

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return time.perf_counter() - started


# ---- peak RSS for a 1 GiB request ----------------------------------------------------------------


def big_instance_header(pixel_bytes: int) -> bytes:
    """A Part 10 header whose last element is a PixelData of ``pixel_bytes`` (the value is streamed)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    frames = pixel_bytes // (4096 * 4096 * 2)
    ds.Rows = ds.Columns = 4096
    ds.NumberOfFrames = frames
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for tag in [t for t in ds.keys() if t >= 0x7FE00010]:  # noqa: SIM118 - tags, not elements
        del ds[tag]
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)


async def streamed_request(count: int, instance_bytes: int) -> AsyncIterator[bytes]:
    piece = bytes(range(256)) * (MIB // 256)
    for _ in range(count):
        header = big_instance_header(instance_bytes)
        yield f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + header
        remaining = instance_bytes
        while remaining > 0:
            take = min(len(piece), remaining)
            yield piece[:take]
            remaining -= take
    yield f"\r\n--{BOUNDARY}--".encode()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


async def peak_rss_for_large_request(
    server: Server, count: int = 8, instance_mib: int = 128
) -> tuple[int, int, float, int]:
    """(baseline KiB, peak KiB, seconds, bytes sent) while the gateway takes one large STOW request."""
    pid = server.process.pid
    baseline = rss_kib(pid, "VmRSS")
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid, "VmRSS"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    headers = {**server.headers(99), "Content-Type": CONTENT_TYPE}
    started = time.perf_counter()
    try:
        async with httpx.AsyncClient(timeout=600) as http:
            answer = await http.post(
                server.stow_url, content=streamed_request(count, instance_mib * MIB), headers=headers
            )
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    if answer.status_code != 200:
        raise RuntimeError(f"large request answered {answer.status_code}: {answer.text[:300]}")
    sent = count * (instance_mib * MIB + len(big_instance_header(instance_mib * MIB)))
    return baseline, peak, seconds, sent


# ---- main ----------------------------------------------------------------------------------------


def target_verdict(rows: list[tuple[object, ...]]) -> str:
    """The benchmark's target, said in one line: the gateway (one replica) with 4 clients at least at
    Orthanc's rate with 4 clients, measured in this run."""
    rate = {(row[0], row[1]): row[4] for row in rows}
    gateway, orthanc = rate.get((GATEWAY_LABEL, 4)), rate.get((ORTHANC_LABEL, 4))
    if gateway is None or orthanc is None:
        return "Target (gateway >= Orthanc with 4 clients): not measured in this run"
    verdict = "met" if gateway >= orthanc else "NOT met"
    return (
        f"Target (gateway >= Orthanc with 4 clients): {verdict}: {gateway:.1f} against {orthanc:.1f}"
        f" instances/s ({100 * gateway / orthanc:.0f} %)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--skip-orthanc", action="store_true")
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument(
        "--skip-floor",
        action="store_true",
        help="do not measure the HTTP floor (a server on the gateway's HTTP stack that only reads and answers)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        default=[1, 2],
        help="gateway replica counts to measure, each sharing one port (default: 1 2)",
    )
    parser.add_argument(
        "--keep-downstream",
        action="store_true",
        help="leave the stack's ingest, deid, analysis and audit running during the measurements",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="enclave-bench-gateway-"))
    servers: list[Server] = []
    rows: list[tuple[str, int, int, float, float, float, float, float, float]] = []
    try:
        if not args.skip_floor:
            servers.append(start_floor(workdir))
        if not args.skip_orthanc:
            servers.append(start_orthanc(workdir))
        for replicas in args.replicas:
            servers.append(start_gateway(workdir, replicas=replicas))
        # Not timed: the same warm-up for every server (connections, caches, Kafka's JIT-compiled
        # request path), so the first measured run is not also the first served.
        for server in servers:
            asyncio.run(post_all(server, mr_instances(WARMUP_INSTANCES), 4))
        with paused(() if args.keep_downstream else DOWNSTREAM) as stopped:
            wait_caught_up(f"enclave-{BENCH_GATEWAY}")
            for clients in (1, 4):
                for server in servers:  # the floor, Orthanc, then the gateway, for each client count
                    instances = mr_instances(args.instances)
                    size = sum(len(i) for i in instances)
                    idle = wait_quiet()
                    cpu_before, stack_before, client_before = (
                        server.cpu_seconds(),
                        stack_cpu_seconds(),
                        time.process_time(),
                    )
                    seconds = asyncio.run(post_all(server, instances, clients))
                    per_instance = 1000 / len(instances)
                    rows.append(
                        (
                            server.name,
                            clients,
                            len(instances),
                            seconds,
                            len(instances) / seconds,
                            size / MIB / seconds,
                            (server.cpu_seconds() - cpu_before) * per_instance,
                            # Less what the stack used idle just before (heartbeats, fetch polls).
                            max(0.0, stack_cpu_seconds() - stack_before - idle * seconds) * per_instance,
                            (time.process_time() - client_before) * per_instance,
                        )
                    )
        print(
            f"\nSTOW-RS, one instance per request, {args.instances} MR instances of {len(instances[0]) // 1024} KiB"
        )
        print(
            "stack services paused (SIGSTOP) while measuring: "
            + (", ".join(stopped) or "none")
            + "; Kafka, MinIO and FerretDB run"
        )
        print(
            f"{'server':<20} {'clients':>7} {'instances':>9} {'seconds':>8} {'inst/s':>8} {'MiB/s':>7}"
            f" {'CPU ms/inst: server':>20} {'stack':>6} {'client':>7}"
        )
        for name, clients, count, seconds, rate, mib, server_ms, stack_ms, client_ms in rows:
            print(
                f"{name:<20} {clients:>7} {count:>9} {seconds:>8.2f} {rate:>8.1f} {mib:>7.1f}"
                f" {server_ms:>20.2f} {stack_ms:>6.2f} {client_ms:>7.2f}"
            )
        print(
            "CPU ms/inst: the server's own processes; the stack's (Kafka, FerretDB, MinIO: what the"
            " gateway's publishes and read model cost); the benchmark client's"
        )
        print(target_verdict(rows))
        if not args.skip_floor:
            print(
                "HTTP floor: uvicorn (uvloop, httptools) reading each body and answering, nothing else:"
                " what the client and the HTTP layer alone allow on this machine"
            )
        if not args.skip_rss:
            large = start_gateway(workdir, throwaway_ingest_key=True)
            servers.append(large)
            asyncio.run(post_all(large, mr_instances(2), 1))
            baseline, peak, seconds, sent = asyncio.run(peak_rss_for_large_request(large))
            print(
                f"\nOne STOW request of 8 x 128 MiB ({sent / MIB:.0f} MiB) into the gateway: {seconds:.1f} s"
                f" ({sent / MIB / seconds:.0f} MiB/s); gateway RSS {baseline / 1024:.0f} MiB before,"
                f" peak {peak / 1024:.0f} MiB (+{(peak - baseline) / 1024:.0f} MiB)"
            )
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
