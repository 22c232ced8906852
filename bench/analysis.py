"""Benchmark of the analysis pipeline on the 1 mm MNI152 2009a template written as a DICOM series.

Prints wall time and peak resident memory per stage as a table. Peak RSS is reset before each
stage through /proc/self/clear_refs (Linux), so each row is that stage's own high-water mark.
Run: `uv run python bench/analysis.py` (make bench-analysis).
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
from enclave_analysis.measures import analyse_volume
from enclave_analysis.phantoms import mni152_volume, write_mr_series
from enclave_analysis.report import png_report, segmentation_dicom, structured_report
from enclave_analysis.volume import build_volume

ROWS: list[tuple[str, float, float]] = []


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


@contextmanager
def stage(name: str) -> Iterator[None]:
    _reset_peak()
    start = time.perf_counter()
    yield
    ROWS.append((name, time.perf_counter() - start, _peak_rss_mib()))


def main() -> None:
    with stage("write DICOM series (fixture, not timed in total)"):
        files = []
        for ds in write_mr_series(mni152_volume()):
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            files.append(buffer.getvalue())
    total_start = time.perf_counter()
    with stage("parse + build volume"):
        volume = build_volume([pydicom.dcmread(io.BytesIO(data)) for data in files[::-1]])
    measures, segmentation = analyse_volume(volume, stage=stage)
    with stage("DICOM SR"):
        structured_report([pydicom.dcmread(io.BytesIO(data)) for data in files[:1]], measures)
    with stage("DICOM SEG"):
        segmentation_dicom([pydicom.dcmread(io.BytesIO(data)) for data in files], segmentation)
    with stage("PNG report"):
        png_report(segmentation, measures)
    total = time.perf_counter() - total_start
    print(f"MNI152 2009a 1 mm template as {len(files)} DICOM slices, volume {volume.shape}")
    print(f"{'stage':<50} {'wall s':>8} {'peak RSS MiB':>13}")
    for name, seconds, peak in ROWS:
        print(f"{name:<50} {seconds:>8.2f} {peak:>13.0f}")
    print(f"{'end to end (parse .. PNG)':<50} {total:>8.2f}")
    print(
        f"GM {measures.grey_matter_volume} mL, WM {measures.white_matter_volume} mL, "
        f"hippocampus {measures.hippocampal_volume_total} mL, thickness {measures.cortical_thickness_mean} mm, "
        f"QC {measures.qc.verdict}"
    )


if __name__ == "__main__":
    main()
