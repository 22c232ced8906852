"""Benchmark: the whole pipeline on the running stack, printed as one table and written as JSON.

    python bench/pipeline.py [--instances 200] [--skip-brain] [--skip-gateway] [--out bench-results/pipeline.json]

- Gateway acceptance side by side with Orthanc's STOW-RS (same files, same client, same run): the
  gateway engineer's ``bench/gateway.py`` is imported and its servers and client are reused.
- Time from the first byte of a 200-instance series to the moment the audit trail holds the
  de-identification of every instance (polling the audit database), and the per-stage throughput
  from the events' own timestamps: received -> stored -> de-identified -> audited.
- Time from the first byte of a 1 mm brain series (the MNI152 template written as DICOM by the
  analysis service's phantoms module) to its analysis result through the results API.
- Peak RSS (VmHWM) and CPU seconds per service, from /proc/<pid> of the pids in .state/pids.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import io
import json
import os
import statistics
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
from pymongo import MongoClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


chaos = _load("enclave_chaos", ROOT / "scripts" / "chaos.py")
from enclave_common import topics  # noqa: E402

GATEWAY = chaos.GATEWAY
SERVICES = chaos.SERVICES
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---- per-process resources --------------------------------------------------------------------


def service_pid(name: str) -> int | None:
    try:
        return int((chaos.STATE / "pids" / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None


def _tree(pid: int) -> list[int]:
    """The process and its descendants (a service may run workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += children.get(current, [])
    return out


def resources(name: str) -> dict[str, float] | None:
    """CPU seconds (user+system) and VmHWM/VmRSS (MiB) of a service's process tree."""
    pid = service_pid(name)
    if pid is None or not Path(f"/proc/{pid}").exists():
        return None
    cpu = hwm = rss = 0.0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                hwm = max(hwm, int(line.split()[1]) / 1024)
            elif line.startswith("VmRSS:"):
                rss += int(line.split()[1]) / 1024
    return {"pid": pid, "cpu_s": cpu, "hwm_mib": hwm, "rss_mib": rss}


# ---- the series benchmark ---------------------------------------------------------------------


async def post_series(parts: list[bytes], tenant: str, *, batch: int, clients: int) -> float:
    """STOW-RS in batches by ``clients`` concurrent clients; returns the monotonic time of the first byte."""
    token = chaos.mint_token("bench-uploader", tenant)
    batches = [parts[i : i + batch] for i in range(0, len(parts), batch)]
    first = time.monotonic()

    async def client_loop() -> None:
        async with httpx.AsyncClient(
            base_url=GATEWAY, headers={"Authorization": f"Bearer {token}"}, timeout=120
        ) as c:
            while batches:
                content_type, body = chaos.related_body(batches.pop(0))
                response = await c.post(
                    "/dicomweb/studies", content=body, headers={"Content-Type": content_type}
                )
                if response.status_code != 200:
                    raise RuntimeError(f"STOW-RS answered {response.status_code}: {response.text[:300]}")

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return first


async def wait_audited_deidentified(
    mongo: MongoClient[dict[str, Any]], tenant: str, count: int, timeout: float
) -> tuple[float, list[Any]]:
    """Monotonic time when the audit trail holds the de-identification of ``count`` instances of the
    tenant, and those events. Audit records are looked up by ``_id`` (= event id): FerretDB v1 scans
    the whole collection for any other filter."""
    deadline = time.monotonic() + timeout
    audited: set[str] = set()
    while time.monotonic() < deadline:
        events = await chaos.read_topic(
            topics.INSTANCE_DEIDENTIFIED, lambda e: e.tenant == tenant, settle=0.5
        )
        fresh = {e.id for e in events} - audited
        audited |= await asyncio.to_thread(chaos.audited_ids, mongo, fresh)
        if len(audited) >= count:
            return time.monotonic(), events
        await asyncio.sleep(0.5)
    raise TimeoutError(f"{count} de-identified instances were not audited within {timeout:.0f} s")


def _times(envelopes: list[Any]) -> dict[str, datetime]:
    """Earliest event time per instance upload id."""
    out: dict[str, datetime] = {}
    for env in envelopes:
        key = env.data["instance_upload_id"]
        if key not in out or env.time < out[key]:
            out[key] = env.time
    return out


def stage_numbers(
    received: list[Any], stored: list[Any], deid: list[Any], audited: dict[str, datetime]
) -> dict[str, Any]:
    """Per stage: instances per second over the stage's own window, and per-instance latency."""
    stages = {
        "received": _times(received),
        "stored": _times(stored),
        "deidentified": _times(deid),
        "audited": audited,
    }
    out: dict[str, Any] = {}
    for name, times in stages.items():
        values = sorted(times.values())
        window = (values[-1] - values[0]).total_seconds() if len(values) > 1 else 0.0
        out[name] = {
            "count": len(values),
            "window_s": window,
            "per_s": len(values) / window if window else None,
        }
    for before, after in (("received", "stored"), ("stored", "deidentified"), ("deidentified", "audited")):
        lat = [
            (stages[after][k] - stages[before][k]).total_seconds()
            for k in stages[after]
            if k in stages[before]
        ]
        if lat:
            out[f"{before}->{after}"] = {
                "p50_s": statistics.median(lat),
                "p95_s": sorted(lat)[int(0.95 * (len(lat) - 1))],
            }
    return out


def audited_times(mongo: MongoClient[dict[str, Any]], deidentified: list[Any]) -> dict[str, datetime]:
    """When the audit service recorded each instance's de-identification (instance upload id -> time)."""
    records = mongo["audit"]["records"]
    out: dict[str, datetime] = {}
    for env in deidentified:
        doc = records.find_one({"_id": env.id}, {"recorded_at": 1})
        if doc is not None:
            out[env.data["instance_upload_id"]] = doc["recorded_at"]
    return out


async def series_benchmark(args: argparse.Namespace, mongo: MongoClient[dict[str, Any]]) -> dict[str, Any]:
    tenant = f"bench-{uuid.uuid4().hex[:10]}"
    study, series = chaos.generate_uid(), chaos.generate_uid()
    parts = [chaos.mr_bytes(study, series, chaos.generate_uid(), n + 1) for n in range(args.instances)]
    first = await post_series(parts, tenant, batch=args.batch, clients=args.clients)
    accepted = time.monotonic()
    done, deid = await wait_audited_deidentified(mongo, tenant, args.instances, args.timeout)
    mine = lambda e: e.tenant == tenant  # noqa: E731
    received = await chaos.read_topic(topics.UPLOAD_RECEIVED, mine, settle=1.0)
    stored = await chaos.read_topic(topics.INSTANCE_STORED, mine, settle=1.0)
    return {
        "tenant": tenant,
        "instances": args.instances,
        "instance_bytes": len(parts[0]),
        "accepted_s": accepted - first,
        "first_byte_to_audited_deidentified_s": done - first,
        "stages": stage_numbers(received, stored, deid, await asyncio.to_thread(audited_times, mongo, deid)),
    }


# ---- the brain series -------------------------------------------------------------------------


def brain_series() -> list[bytes] | None:
    try:
        from enclave_analysis.phantoms import mni152_volume, write_mr_series
    except ImportError:
        return None
    out = []
    for ds in write_mr_series(
        mni152_volume(), patient_name=chaos.PHI["PatientName"], patient_id=chaos.PHI["PatientID"]
    ):
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


async def brain_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    parts = await asyncio.to_thread(brain_series)
    if parts is None:
        return {"skipped": "enclave_analysis.phantoms is not available"}
    tenant = f"bench-brain-{uuid.uuid4().hex[:8]}"
    token = chaos.mint_token("bench-uploader", tenant)
    clinician = chaos.mint_token("bench-clinician", tenant, roles=("clinician",))
    first = time.monotonic()
    files = [("files", (f"s{i}.dcm", p, "application/dicom")) for i, p in enumerate(parts)]
    async with httpx.AsyncClient(base_url=GATEWAY, timeout=300) as client:
        response = await client.post(
            "/api/v1/imaging/upload", files=files, headers={"Authorization": f"Bearer {token}"}
        )
        if response.status_code != 200:
            return {"error": f"upload answered {response.status_code}: {response.text[:300]}"}
        accepted = time.monotonic()
        imaging_id = response.json()["accepted"][0]["imaging_id"]
        body: dict[str, Any] = {}
        while time.monotonic() - first < args.timeout:
            result = await client.get(
                f"/api/v1/imaging/{imaging_id}/analysis", headers={"Authorization": f"Bearer {clinician}"}
            )
            body = result.json()
            if body.get("status") not in (None, "pending"):
                break
            await asyncio.sleep(1)
        else:
            return {"error": f"no analysis result within {args.timeout:.0f} s", "last": body}
    return {
        "slices": len(parts),
        "series_mib": sum(len(p) for p in parts) / 2**20,
        "accepted_s": accepted - first,
        "first_byte_to_analysis_s": time.monotonic() - first,
        "status": body.get("status"),
        "measures": body.get("measures"),
    }


# ---- gateway vs Orthanc (bench/gateway.py) ------------------------------------------------------


def gateway_vs_orthanc(args: argparse.Namespace) -> list[dict[str, Any]] | dict[str, str]:
    path = ROOT / "bench" / "gateway.py"
    if not path.exists():
        return {
            "skipped": "bench/gateway.py is not there yet (hook: its start_gateway/start_orthanc/post_all)"
        }
    import shutil
    import tempfile

    gw = _load("enclave_bench_gateway", path)
    workdir = Path(tempfile.mkdtemp(prefix="enclave-bench-pipeline-"))
    servers = []
    rows: list[dict[str, Any]] = []
    try:
        servers.append(gw.start_gateway(workdir))
        try:
            servers.append(gw.start_orthanc(workdir))
        except Exception as exc:  # Orthanc not installed: the row says so
            rows.append({"server": "orthanc", "error": f"{type(exc).__name__}: {exc}"[:200]})
        for server in servers:
            asyncio.run(gw.post_all(server, gw.mr_instances(5), 1))
        for clients in (1, 4):
            for server in servers:
                instances = gw.mr_instances(args.gateway_instances)
                seconds = asyncio.run(gw.post_all(server, instances, clients))
                rows.append(
                    {
                        "server": server.name,
                        "clients": clients,
                        "instances": len(instances),
                        "per_s": len(instances) / seconds,
                        "mib_per_s": sum(map(len, instances)) / 2**20 / seconds,
                    }
                )
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


# ---- report -----------------------------------------------------------------------------------


def rows_of(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    gateway = results.get("gateway_vs_orthanc")
    if isinstance(gateway, list):
        for r in gateway:
            if "error" in r:
                rows.append((f"STOW-RS {r['server']}", "-", r["error"]))
            else:
                rows.append(
                    (
                        f"STOW-RS {r['server']}, {r['clients']} client(s)",
                        f"{r['per_s']:.1f} inst/s",
                        f"{r['mib_per_s']:.1f} MiB/s, {r['instances']} x 128 KiB, one instance per request",
                    )
                )
    elif isinstance(gateway, dict):
        rows.append(("STOW-RS gateway vs Orthanc", "-", gateway.get("skipped", "")))
    series = results.get("series", {})
    if "first_byte_to_audited_deidentified_s" in series:
        n = series["instances"]
        rows.append(
            (
                f"{n}-instance series: accepted by the gateway",
                f"{series['accepted_s']:.1f} s",
                f"{series['instance_bytes'] // 1024} KiB each",
            )
        )
        rows.append(
            (
                f"{n}-instance series: first byte -> audited and de-identified",
                f"{series['first_byte_to_audited_deidentified_s']:.1f} s",
                "audit db polled",
            )
        )
        for stage in ("received", "stored", "deidentified", "audited"):
            s = series["stages"].get(stage, {})
            rate = s.get("per_s")
            rows.append(
                (
                    f"  stage {stage}",
                    f"{rate:.1f} inst/s" if rate else "-",
                    f"{s.get('count', 0)} events over {s.get('window_s', 0):.1f} s",
                )
            )
        for hop in ("received->stored", "stored->deidentified", "deidentified->audited"):
            h = series["stages"].get(hop)
            if h:
                rows.append((f"  latency {hop}", f"p50 {h['p50_s']:.2f} s", f"p95 {h['p95_s']:.2f} s"))
    elif series:
        rows.append(("series", "-", str(series.get("error", series))))
    brain = results.get("brain", {})
    if "first_byte_to_analysis_s" in brain:
        rows.append(
            (
                "1 mm brain series: first byte -> analysis result",
                f"{brain['first_byte_to_analysis_s']:.1f} s",
                f"{brain['slices']} slices, {brain['series_mib']:.0f} MiB, status {brain['status']}",
            )
        )
    elif brain:
        rows.append(("1 mm brain series", "-", str(brain.get("skipped") or brain.get("error"))[:120]))
    for name, r in results.get("resources", {}).items():
        if r is None:
            rows.append((f"{name} resources", "-", "not running"))
        else:
            rows.append(
                (
                    f"{name} peak RSS (VmHWM)",
                    f"{r['hwm_mib']:.0f} MiB",
                    f"CPU {r['cpu_s_during']:.1f} s during the bench ({r['cpu_pct']:.0f}% of one core)",
                )
            )
    return rows


def _guarded(run: Any) -> dict[str, Any]:
    """One part of the benchmark; a failure is reported in its row instead of ending the run."""
    try:
        return dict(run())
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--batch", type=int, default=10, help="instances per STOW-RS request")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--gateway-instances", type=int, default=200)
    parser.add_argument("--skip-gateway", action="store_true", help="skip the gateway vs Orthanc comparison")
    parser.add_argument("--skip-brain", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "pipeline.json"))
    args = parser.parse_args(argv)
    if not chaos.all_ready():
        print("the five services are not all ready; start them with `make up`", file=sys.stderr)
        return 2
    mongo: MongoClient[dict[str, Any]] = MongoClient(chaos.MONGO_URL, tz_aware=True)
    before = {name: resources(name) for name in SERVICES}
    started = time.monotonic()
    results: dict[str, Any] = {"started_at": datetime.now().astimezone().isoformat()}
    results["series"] = _guarded(lambda: asyncio.run(series_benchmark(args, mongo)))
    if not args.skip_brain:
        results["brain"] = _guarded(lambda: asyncio.run(brain_benchmark(args)))
    elapsed = time.monotonic() - started
    after = {name: resources(name) for name in SERVICES}
    results["resources"] = {}
    for name in SERVICES:
        b, a = before[name], after[name]
        if a is None:
            results["resources"][name] = None
            continue
        during = a["cpu_s"] - (b["cpu_s"] if b and b["pid"] == a["pid"] else 0.0)
        results["resources"][name] = {**a, "cpu_s_during": during, "cpu_pct": 100 * during / elapsed}
    if not args.skip_gateway:
        try:
            results["gateway_vs_orthanc"] = gateway_vs_orthanc(args)
        except Exception as exc:
            results["gateway_vs_orthanc"] = {"skipped": f"failed: {type(exc).__name__}: {exc}"[:300]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nEnclave pipeline benchmark ({elapsed:.0f} s, 2-core dev machine, services as local processes)")
    print(chaos.table(["measure", "value", "detail"], [list(r) for r in rows_of(results)]))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
