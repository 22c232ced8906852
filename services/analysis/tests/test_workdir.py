"""What a killed analysis worker leaves in the temporary directory is removed by the next worker;
what a living worker uses is not (``enclave_analysis.workdir``). Before, ANTs' files of a worker
killed mid-analysis (OOM, a node drain) stayed in the pod's emptyDir until it was evicted."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from enclave_analysis import workdir

_WORKER = """
import os, signal, sys, tempfile, time
from pathlib import Path
from enclave_analysis import workdir
mine = workdir.claim(Path(sys.argv[1]))
scratch = Path(tempfile.mkdtemp(prefix="enclave-ants-"))  # as segment_brain's directory
(scratch / "transform.mat").write_bytes(b"t" * 4096)
print(mine, flush=True)
if sys.argv[2] == "killed":
    os.kill(os.getpid(), signal.SIGKILL)  # mid-analysis
time.sleep(60)
"""


def _worker(parent: Path, fate: str) -> tuple[subprocess.Popen[str], Path]:
    process = subprocess.Popen(
        [sys.executable, "-c", _WORKER, str(parent), fate], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_the_directory_of_a_killed_worker_is_removed_and_a_living_one_kept(tmp_path: Path) -> None:
    killed, killed_dir = _worker(tmp_path, "killed")
    assert killed.wait(timeout=30) == -signal.SIGKILL
    assert killed_dir.parent == tmp_path
    assert list(killed_dir.glob("enclave-ants-*/transform.mat"))  # what the kill left
    living, living_dir = _worker(tmp_path, "living")  # its start removes what the killed one left
    try:
        assert not killed_dir.exists()
        assert workdir.sweep(tmp_path) == []  # a living worker's directory stays, however old
        assert list(living_dir.glob("enclave-ants-*/transform.mat"))
    finally:
        living.kill()
        living.wait(timeout=30)
    assert workdir.sweep(tmp_path) == [living_dir]
    assert list(tmp_path.iterdir()) == []


def test_a_directory_not_locked_yet_is_left_alone_while_young(tmp_path: Path) -> None:
    """A starting worker holds no lock between creating its directory and locking it."""
    fresh = Path(tempfile.mkdtemp(prefix=workdir.PREFIX, dir=tmp_path))
    assert workdir.sweep(tmp_path) == []
    assert fresh.exists()
    assert workdir.sweep(tmp_path, min_age_s=0) == [fresh]


def test_what_cannot_be_examined_does_not_stop_a_worker_from_starting(tmp_path: Path) -> None:
    """A file (or another user's directory) with the prefix: before, ``claim`` raised, and every
    analysis failed with BrokenProcessPool."""
    (tmp_path / f"{workdir.PREFIX}junk").write_text("not a directory")
    assert workdir.sweep(tmp_path, min_age_s=0) == []
    mine = workdir.claim(tmp_path)
    try:
        assert mine.is_dir() and (mine / workdir.LOCK).exists()
    finally:
        tempfile.tempdir = None


def test_the_analysis_worker_process_writes_its_temporary_files_in_its_own_directory(tmp_path: Path) -> None:
    with ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=workdir.claim,
        initargs=(tmp_path,),
    ) as pool:
        where = Path(pool.submit(tempfile.gettempdir).result(timeout=60))
        assert where.parent == tmp_path and where.name.startswith(workdir.PREFIX)
        assert (where / workdir.LOCK).exists()
        assert workdir.sweep(tmp_path, min_age_s=0) == []  # its worker lives
