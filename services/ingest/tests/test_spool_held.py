"""What ingest's spool holds, for the alert before its volume fills (EnclaveIngestSpoolFilling), and
what a restart leaves of it. The spool has no budget (refusing chunks would stall the instances they
belong to); it is measured instead."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from enclave_ingest.handlers import ChunkConsumer
from enclave_ingest.spool import ChunkSpool
from prometheus_client import CollectorRegistry

A = "01a2033b-be48-704a-8a9d-b1a1f0d0f75b"
B = "01a2033b-be48-704a-8a9d-b1a1f0d0f75c"


def test_held_bytes_count_each_chunk_once_and_go_with_the_instance(tmp_path: Path) -> None:
    spool = ChunkSpool(tmp_path / "spool")
    spool.prepare()
    spool.write(A, 0, b"x" * 1000, {"count": 2})
    spool.write(A, 1, b"y" * 500, {})
    spool.write(B, 0, b"z" * 300, {"count": 3})
    assert (spool.held_bytes, spool.held_instances) == (1800, 2)
    spool.write(A, 1, b"y" * 400, {})  # a redelivered chunk overwrites its file: counted once
    assert spool.held_bytes == 1700
    spool.discard(A)
    assert (spool.held_bytes, spool.held_instances) == (300, 1)
    spool.clear()
    assert (spool.held_bytes, spool.held_instances) == (0, 0)


def test_a_restart_clears_every_leftover_including_loose_files(tmp_path: Path) -> None:
    """What a killed process left: instance folders, and loose files (a ciphertext being written
    when it died, before the ciphertext became an unnamed file). ``clear`` used ``rmtree`` with
    errors ignored, which left every loose file behind, in an emptyDir that outlives the container."""
    root = tmp_path / "spool"
    spool = ChunkSpool(root)
    spool.prepare()
    spool.write(A, 0, b"x" * 10, {"count": 2})
    (root / "ciphertext-leftover").write_bytes(b"c" * 100)
    ChunkSpool(root).prepare()
    assert list(root.iterdir()) == []


def test_the_consumer_publishes_what_the_spool_holds_and_the_volume_size(tmp_path: Path) -> None:
    spool = ChunkSpool(tmp_path / "spool")
    spool.prepare()
    registry = CollectorRegistry()
    runtime = SimpleNamespace(registry=registry)
    ChunkConsumer(runtime, catalogue=None, spool=spool, spool_capacity_bytes=6 * 1024**3)  # type: ignore[arg-type]
    spool.write(A, 0, b"x" * 1234, {"count": 2})
    assert registry.get_sample_value("enclave_ingest_spool_bytes") == 1234
    assert registry.get_sample_value("enclave_ingest_spool_instances") == 1
    assert registry.get_sample_value("enclave_ingest_spool_capacity_bytes") == 6 * 1024**3
