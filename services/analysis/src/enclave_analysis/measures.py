"""Volumetric measures and quality control from a :class:`Segmentation`.

Volumes are in mL (sums of posterior probabilities or fractional atlas labels times the voxel
volume), cortical thickness in mm. A measure that cannot be trusted is ``None`` and its reason is
in ``unavailable``. Field names include the seed's ``hippocampal_volume_total`` and
``cortical_thickness_mean``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset
from scipy import ndimage

from enclave_analysis.segmentation import PipelineOptions, Segmentation, StageTimer, segment_brain
from enclave_analysis.volume import DEFAULT_LIMITS, Volume, VolumeLimits, build_volume

#: Below these fractions of the template's intracranial space / hippocampi inside the field of
#: view, the whole-brain / hippocampal volumes are reported as unavailable.
MIN_BRAIN_COVERAGE = 0.97
MIN_HIPPOCAMPUS_COVERAGE = 0.99


class QualityControl(BaseModel):
    """Image and registration quality; ``verdict`` is pass, warn or fail with the reasons."""

    model_config = ConfigDict(frozen=True)

    snr: float = Field(description="white-matter mean over white-matter standard deviation")
    cnr_gm_wm: float = Field(description="(WM mean - GM mean) over the pooled tissue standard deviation")
    brain_coverage: float = Field(
        description="fraction of the template intracranial space inside the field of view"
    )
    hippocampus_coverage: float
    template_correlation: float = Field(
        description="Pearson r of the warped template and the subject in the mask"
    )
    verdict: Literal["pass", "warn", "fail"]
    reasons: list[str] = Field(default_factory=list)
    in_plane_reduction: int = Field(
        default=1,
        description="f when each slice was averaged in f x f blocks before the analysis (f from 2 to 4: "
        "the series had more voxels than ENCLAVE_ANALYSIS_MAX_SERIES_VOXELS); 1 when it was analysed "
        "at its acquired matrix",
    )
    analysed_shape: list[int] = Field(
        description="voxels of the volume as analysed along i (a row), j (a column) and k (the slice "
        "normal): its columns, rows and slices, after any in-plane reduction"
    )
    analysed_voxel_size_mm: list[float] = Field(
        description="voxel edges of the volume as analysed along i, j and k in mm: the column and row "
        "spacing (PixelSpacing) times the in-plane reduction, and the spacing of the slices"
    )


class BrainVolumetrics(BaseModel):
    """The measures of one T1 brain series (mL unless stated)."""

    model_config = ConfigDict(frozen=True)

    intracranial_volume: float | None
    brain_parenchyma_volume: float | None
    grey_matter_volume: float | None
    white_matter_volume: float | None
    csf_volume: float | None
    brain_parenchymal_fraction: float | None = Field(description="(GM + WM) / intracranial volume, unitless")
    hippocampal_volume_left: float | None
    hippocampal_volume_right: float | None
    hippocampal_volume_total: float | None
    cortical_thickness_mean: float | None = Field(description="mean DiReCT thickness over cortical GM, mm")
    unavailable: dict[str, str] = Field(default_factory=dict, description="measure name -> why it is null")
    qc: QualityControl
    atlas: str
    template: str = "MNI152 2009a nonlinear symmetric (nilearn)"
    timings_s: dict[str, float] = Field(default_factory=dict)


def analyse_series(
    datasets: Sequence[Dataset],
    options: PipelineOptions | None = None,
    stage: StageTimer | None = None,
    limits: VolumeLimits = DEFAULT_LIMITS,
) -> tuple[BrainVolumetrics, Segmentation]:
    """Build the volume of one series, segment it and measure it (raises AnalysisError subclasses)."""
    volume = build_volume(datasets, limits)
    return analyse_volume(volume, options, stage)


def analyse_volume(
    volume: Volume, options: PipelineOptions | None = None, stage: StageTimer | None = None
) -> tuple[BrainVolumetrics, Segmentation]:
    """Segment one volume and measure it."""
    segmentation = segment_brain(volume, options, stage)
    return volumetrics_of(segmentation), segmentation


def _tissue_stats(segmentation: Segmentation) -> tuple[float, float, float, float]:
    """Mean and standard deviation of WM and GM in confidently classified, eroded cores."""
    corrected = segmentation.corrected
    wm_core = ndimage.binary_erosion(segmentation.wm > 0.95)
    gm_core = segmentation.gm > 0.95
    if wm_core.sum() < 50:
        wm_core = segmentation.wm > 0.95
    wm = corrected[wm_core] if wm_core.any() else np.array([np.nan])
    gm = corrected[gm_core] if gm_core.any() else np.array([np.nan])
    return float(wm.mean()), float(wm.std()), float(gm.mean()), float(gm.std())


def quality_of(segmentation: Segmentation) -> QualityControl:
    """SNR, GM/WM CNR, coverage and registration quality with a verdict, and the volume the numbers
    were computed on (its in-plane reduction, shape and voxel size). The reduction does not change the
    verdict: the pipeline registers on a 2 mm grid and bias-corrects at 4 mm."""
    wm_mean, wm_sd, gm_mean, gm_sd = _tissue_stats(segmentation)
    snr = wm_mean / wm_sd if wm_sd > 0 else float("inf")
    pooled = float(np.sqrt((wm_sd**2 + gm_sd**2) / 2))
    cnr = (wm_mean - gm_mean) / pooled if pooled > 0 else float("inf")
    failures, warnings = [], []
    if segmentation.template_correlation < 0.6:
        failures.append(
            f"registration to the template is poor (r = {segmentation.template_correlation:.2f} < 0.60)"
        )
    elif segmentation.template_correlation < 0.75:
        warnings.append(
            f"registration to the template is fair (r = {segmentation.template_correlation:.2f} < 0.75)"
        )
    if segmentation.brain_coverage < 0.9:
        failures.append(
            f"only {segmentation.brain_coverage:.0%} of the intracranial space is in the field of view"
        )
    elif segmentation.brain_coverage < MIN_BRAIN_COVERAGE:
        warnings.append(
            f"{segmentation.brain_coverage:.0%} of the intracranial space is in the field of view"
        )
    if not np.isfinite(cnr) or cnr < 1.0:
        failures.append(f"grey/white contrast-to-noise {cnr:.2f} is below 1.0")
    elif cnr < 2.0:
        warnings.append(f"grey/white contrast-to-noise {cnr:.2f} is below 2.0")
    if snr < 10:
        warnings.append(f"white-matter SNR {snr:.1f} is below 10")
    verdict: Literal["pass", "warn", "fail"] = "fail" if failures else "warn" if warnings else "pass"
    return QualityControl(
        snr=round(float(min(snr, 1e6)), 2),
        cnr_gm_wm=round(float(min(cnr, 1e6)), 2),
        brain_coverage=round(segmentation.brain_coverage, 4),
        hippocampus_coverage=round(segmentation.hippocampus_coverage, 4),
        template_correlation=round(segmentation.template_correlation, 4),
        verdict=verdict,
        reasons=failures + warnings,
        in_plane_reduction=segmentation.volume.in_plane_reduction,
        analysed_shape=list(segmentation.volume.shape),
        analysed_voxel_size_mm=[round(size, 4) for size in segmentation.volume.spacing_mm],
    )


def volumetrics_of(segmentation: Segmentation) -> BrainVolumetrics:
    """Measures in mL / mm with reasons for the ones that cannot be computed."""
    voxel_ml = segmentation.volume.voxel_volume_ml
    unavailable: dict[str, str] = {}
    values: dict[str, float | None] = {
        "intracranial_volume": float(segmentation.intracranial.sum()) * voxel_ml,
        "grey_matter_volume": float(segmentation.gm.sum(dtype=np.float64)) * voxel_ml,
        "white_matter_volume": float(segmentation.wm.sum(dtype=np.float64)) * voxel_ml,
        "csf_volume": float(segmentation.csf.sum(dtype=np.float64)) * voxel_ml,
        "hippocampal_volume_left": float(segmentation.hippocampus_left.sum(dtype=np.float64)) * voxel_ml,
        "hippocampal_volume_right": float(segmentation.hippocampus_right.sum(dtype=np.float64)) * voxel_ml,
    }
    gm, wm, tiv = values["grey_matter_volume"], values["white_matter_volume"], values["intracranial_volume"]
    brain = (gm or 0.0) + (wm or 0.0)
    values["brain_parenchyma_volume"] = brain
    values["brain_parenchymal_fraction"] = brain / tiv if tiv else None
    values["hippocampal_volume_total"] = (values["hippocampal_volume_left"] or 0.0) + (
        values["hippocampal_volume_right"] or 0.0
    )
    values["cortical_thickness_mean"] = None
    if segmentation.thickness is None:
        unavailable["cortical_thickness_mean"] = (
            "cortical thickness was not computed (disabled in the options)"
        )
    else:
        cortex = (segmentation.labels == 2) & (segmentation.thickness > 0)
        if cortex.sum() < 100:
            unavailable["cortical_thickness_mean"] = "too few cortical voxels to estimate thickness"
        else:
            values["cortical_thickness_mean"] = float(segmentation.thickness[cortex].mean())

    if segmentation.brain_coverage < MIN_BRAIN_COVERAGE:
        reason = (
            f"the field of view holds {segmentation.brain_coverage:.0%} of the intracranial space; "
            f"at least {MIN_BRAIN_COVERAGE:.0%} is required for whole-brain volumes"
        )
        for name in (
            "intracranial_volume",
            "brain_parenchyma_volume",
            "grey_matter_volume",
            "white_matter_volume",
            "csf_volume",
            "brain_parenchymal_fraction",
        ):
            unavailable[name] = reason
    if segmentation.hippocampus_coverage < MIN_HIPPOCAMPUS_COVERAGE:
        reason = (
            f"the field of view holds {segmentation.hippocampus_coverage:.0%} of the atlas hippocampi; "
            f"at least {MIN_HIPPOCAMPUS_COVERAGE:.0%} is required"
        )
        for name in ("hippocampal_volume_left", "hippocampal_volume_right", "hippocampal_volume_total"):
            unavailable[name] = reason
    for name in unavailable:
        values[name] = None
    rounded = {name: (None if value is None else round(value, 3)) for name, value in values.items()}
    return BrainVolumetrics(
        **rounded,
        unavailable=unavailable,
        qc=quality_of(segmentation),
        atlas=segmentation.atlas,
        timings_s=dict(segmentation.timings_s),
    )
