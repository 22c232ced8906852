"""The analyser the service runs on one complete series: volume, measures, QC and reports.

Pure domain (no Kafka, S3 or MongoDB): datasets in, numbers and report bytes out.
"""

from __future__ import annotations

from typing import Any

import pydicom

from enclave_analysis.measures import analyse_series
from enclave_analysis.report import png_report, segmentation_dicom, structured_report
from enclave_analysis.volume import DEFAULT_LIMITS, VolumeLimits

MEASURE_FIELDS = (
    "intracranial_volume",
    "brain_parenchyma_volume",
    "grey_matter_volume",
    "white_matter_volume",
    "csf_volume",
    "brain_parenchymal_fraction",
    "hippocampal_volume_left",
    "hippocampal_volume_right",
    "hippocampal_volume_total",
    "cortical_thickness_mean",
)


def run_volumetrics(
    datasets: list[pydicom.Dataset], limits: VolumeLimits = DEFAULT_LIMITS
) -> tuple[dict[str, float | None], dict[str, Any], dict[str, str], list[tuple[str, str, bytes]]]:
    """Measures (mL; thickness in mm), QC, why any measure is null, and the report files: a DICOM SR
    (TID 1500), a DICOM Segmentation of the tissue and hippocampus labels (both highdicom) and a PNG.
    ``limits`` bound the volume before anything is decoded (``build_volume``)."""
    volumetrics, segmentation = analyse_series(datasets, limits=limits)
    measures = {name: getattr(volumetrics, name) for name in MEASURE_FIELDS}
    qc = volumetrics.qc.model_dump(mode="json") | {
        "atlas": volumetrics.atlas,
        "template": volumetrics.template,
    }
    reports: list[tuple[str, str, bytes]] = [
        ("measurements-sr.dcm", "application/dicom", structured_report(datasets, volumetrics)),
        ("segmentation.dcm", "application/dicom", segmentation_dicom(datasets, segmentation)),
        ("report.png", "image/png", png_report(segmentation, volumetrics)),
    ]
    return measures, qc, dict(volumetrics.unavailable), reports
