"""Brain tissue segmentation, hippocampus labelling and cortical thickness with ANTs (antspyx).

Pipeline (each step is ANTs; the glue is numpy/scipy):

1. N4 bias-field correction (Tustison 2010), estimated on a 2 mm copy and applied at native
   resolution (the field is smooth, so this costs little accuracy and saves most of the time).
2. Registration of the MNI152 2009a template to the subject at 2 mm: affine then a light SyN
   (Avants 2008), Mattes mutual information.
3. Intracranial mask: the warped template mask, trimmed to voxels brighter than a fifth of
   the white-matter level (so dark bone and air are left out), plus the eroded warped mask
   (so dark ventricles and sulci stay in), holes filled, largest component kept.
4. Atropos (Avants 2011) three-class (CSF, GM, WM) segmentation at native resolution with the
   warped template tissue maps as priors; volumes are sums of the posterior probabilities.
5. Hippocampus: the atlas's left and right labels, resampled to template space, are warped to
   the subject with the same transforms (linear interpolation, fractional volumes).
6. Cortical thickness: DiReCT / KellyKapowski (Das 2009) on the Atropos labels and posteriors.

Written by hand: the intracranial mask rule and the QC numbers (ANTs has no such functions).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from enclave_analysis.atlas import DEFAULT_ATLAS, atlas_named, hippocampus_masks, mni_template
from enclave_analysis.errors import NotBrainT1Error
from enclave_analysis.volume import LPS_TO_RAS, Volume, check_field_of_view

if TYPE_CHECKING:
    import ants

# ANTsPy is imported where it is used: importing it costs ~6 s (statsmodels, pandas, plotting), which
# would otherwise delay every start of the service; `warm_up` imports it in the background instead
# (and loads the template, whose nilearn import costs another ~3 s).

FloatArray = npt.NDArray[np.float32]
#: Thicker "grey matter" is deep grey matter (thalamus, basal ganglia), not cortex.
MAX_CORTICAL_THICKNESS_MM = 8.0
#: Added to every prior so that a class the template deems impossible can still win on intensity.
PRIOR_FLOOR = 0.1
StageTimer = Callable[[str], AbstractContextManager[None]]


@dataclass(frozen=True)
class PipelineOptions:
    """Speed/accuracy knobs; the defaults keep the 1 mm template under a minute on 2 cores."""

    atlas: str = DEFAULT_ATLAS
    bias_field_spacing_mm: float = 4.0
    registration_spacing_mm: float = 2.0
    affine_iterations: tuple[int, ...] = (200, 100, 50)
    syn_iterations: tuple[int, ...] = (40, 20, 0)
    tissue_model: Literal["em", "atropos"] = "em"
    tissue_iterations: int = 8
    #: Exponent of the priors in the EM model (``classify_tissue``).
    prior_weight: float = 2.0
    #: Atropos's own prior weight, in [0, 1] (0.25 as in antsAtroposN4.sh).
    atropos_prior_weight: float = 0.25
    thickness_method: Literal["distance", "direct"] = "distance"
    direct_iterations: int = 45
    compute_thickness: bool = True
    #: Below this Pearson r between warped template and subject the series is "not a brain".
    #: Geometric phantoms are not brains: their tests lower it (they check volumes, not anatomy).
    min_template_correlation: float = 0.3
    random_seed: int = 1


@dataclass
class Segmentation:
    """Everything measured in the subject's voxel grid (same shape and affine as the input)."""

    volume: Volume
    corrected: FloatArray
    intracranial: npt.NDArray[np.bool_]
    csf: FloatArray
    gm: FloatArray
    wm: FloatArray
    labels: npt.NDArray[np.uint8]
    hippocampus_left: FloatArray
    hippocampus_right: FloatArray
    thickness: FloatArray | None
    template_correlation: float
    brain_coverage: float
    hippocampus_coverage: float
    tissue_means: dict[str, float]
    atlas: str
    timings_s: dict[str, float] = field(default_factory=dict)


def to_ants(array: npt.NDArray[np.generic], affine_ras: npt.NDArray[np.float64]) -> ants.ANTsImage:
    """An ANTs (ITK, LPS) image from an array and its voxel-to-RAS affine."""
    import ants  # imported here: see the module note

    lps = LPS_TO_RAS @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return ants.from_numpy(
        np.ascontiguousarray(array, dtype=np.float32),
        origin=tuple(float(v) for v in lps[:3, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=direction,
    )


def _like(reference: ants.ANTsImage, array: npt.NDArray[np.generic]) -> ants.ANTsImage:
    return reference.new_image_like(np.ascontiguousarray(array, dtype=np.float32))


@contextmanager
def _timed(timings: dict[str, float], name: str, outer: StageTimer | None) -> Iterator[None]:
    start = time.perf_counter()
    if outer is None:
        yield
    else:
        with outer(name):
            yield
    timings[name] = round(time.perf_counter() - start, 3)


def segment_brain(
    volume: Volume, options: PipelineOptions | None = None, stage: StageTimer | None = None
) -> Segmentation:
    """Run the pipeline on one T1 volume; ``stage`` (optional) wraps each named step, e.g. to profile.

    Raises :class:`NotBrainT1Error` when the volume does not register to the brain template or
    its tissue contrast is not T1-like (white matter brighter than grey matter brighter than CSF).

    ANTs writes the registration's transforms (~20 MB at 1 mm) to files: they go to a directory of
    this call, removed when it ends. (ANTs' default, a new name in the temporary directory each time,
    was never removed: a pod's temporary volume filled up after a few hundred analyses.)
    """
    with tempfile.TemporaryDirectory(prefix="enclave-ants-") as workdir:
        return _segment_brain(volume, options, stage, Path(workdir))


def _segment_brain(
    volume: Volume, options: PipelineOptions | None, stage: StageTimer | None, workdir: Path
) -> Segmentation:
    if min(volume.shape) < 8:
        raise NotBrainT1Error(f"volume of shape {volume.shape} is too thin; a 3D brain volume is required")
    _check_field_of_view(volume)
    import ants  # imported here: see the module note

    options = options or PipelineOptions()
    atlas = atlas_named(options.atlas)
    timings: dict[str, float] = {}
    template = mni_template()

    with _timed(timings, "bias_correction", stage):
        subject = to_ants(volume.voxels, volume.affine_ras)
        corrected_image = _n4(subject, options.bias_field_spacing_mm)
        corrected = corrected_image.numpy()

    with _timed(timings, "registration", stage):
        template_t1 = to_ants(template.t1, template.affine_ras)
        step = (options.registration_spacing_mm,) * 3
        fixed = ants.resample_image(corrected_image, step, False, 0)
        moving = ants.resample_image(template_t1, step, False, 0)
        # antspyx's registration() swallows unknown keywords, so random_seed=... would be ignored: it
        # reads the seed from ants.config (what ants.set_ants_deterministic sets). Without a seed the
        # metric's random sampling differs from run to run, and so do the results.
        ants.config._random_seed = options.random_seed
        registration = ants.registration(
            fixed=fixed,
            moving=moving,
            type_of_transform="SyN",
            aff_iterations=options.affine_iterations,
            aff_shrink_factors=(4, 2, 1),
            aff_smoothing_sigmas=(2, 1, 0),
            reg_iterations=options.syn_iterations,
            outprefix=str(workdir / "registration-"),
            verbose=False,
        )
        forward, inverse = registration["fwdtransforms"], registration["invtransforms"]

    with _timed(timings, "priors", stage):

        def upsample(coarse: npt.NDArray[np.generic]) -> FloatArray:
            native = ants.resample_image_to_target(
                _like(fixed, coarse), corrected_image, interp_type="linear"
            )
            return np.asarray(native.numpy(), dtype=np.float32)

        def warp(array: npt.NDArray[np.generic], affine: npt.NDArray[np.float64]) -> FloatArray:
            """Warp at the registration grid, then upsample: priors are smooth, this is 8x cheaper."""
            moved = ants.apply_transforms(
                fixed=fixed, moving=to_ants(array, affine), transformlist=forward, interpolator="linear"
            )
            return np.clip(upsample(moved.numpy()), 0.0, 1.0)

        coarse_t1 = ants.apply_transforms(
            fixed=fixed, moving=moving, transformlist=forward, interpolator="linear"
        )
        coarse_warped_mask = ants.apply_transforms(
            fixed=fixed, moving=to_ants(template.intracranial, template.affine_ras), transformlist=forward
        ).numpy()
        coarse_mask = coarse_warped_mask > 0.5
        correlation = (
            float(np.corrcoef(coarse_t1.numpy()[coarse_mask], fixed.numpy()[coarse_mask])[0, 1])
            if coarse_mask.any()
            else float("nan")
        )
        _check_registration(correlation, options.min_template_correlation)
        signed_distance = ndimage.distance_transform_edt(~coarse_mask, sampling=fixed.spacing) - (
            ndimage.distance_transform_edt(coarse_mask, sampling=fixed.spacing)
        )
        warped_mask = np.clip(upsample(coarse_warped_mask), 0.0, 1.0)
        gm_prior = warp(template.gm, template.affine_ras)
        wm_prior = warp(template.wm, template.affine_ras)
        native_distance = upsample(signed_distance)
        smooth = _smoothed(corrected, volume.spacing_mm)  # for both passes of the intracranial mask
        intracranial = _intracranial_mask(smooth, native_distance)
        if not intracranial.any():
            raise NotBrainT1Error("no intracranial region found; a T1-weighted brain volume is required")
        csf_prior = np.clip(warped_mask - gm_prior - wm_prior, 0.0, 1.0)
        priors = np.stack([csf_prior, gm_prior, wm_prior]) + 1e-3
        priors = (priors / priors.sum(axis=0, keepdims=True)).astype(np.float32)

    with _timed(timings, "tissue_segmentation", stage):
        if options.tissue_model == "atropos":
            csf, gm, wm = _atropos(corrected_image, intracranial, priors, options)
        else:
            csf, gm, wm = classify_tissue(
                corrected, intracranial, priors, options.prior_weight, options.tissue_iterations
            )
        tissue_means = {
            name: float((corrected * p).sum() / max(float(p.sum()), 1e-9))
            for name, p in zip(("csf", "gm", "wm"), (csf, gm, wm), strict=True)
        }
        intracranial, csf, gm, wm = _refine_outer_edge(
            smooth, native_distance, intracranial, (csf, gm, wm), tissue_means["csf"]
        )
        del native_distance, smooth
        posteriors = np.stack([csf, gm, wm])
        labels = np.where(intracranial, posteriors.argmax(axis=0) + 1, 0).astype(np.uint8)

    with _timed(timings, "hippocampus", stage):
        left, right, atlas_affine = hippocampus_masks(atlas)
        template_grid = to_ants(template.t1, template.affine_ras)
        left_t = ants.resample_image_to_target(
            to_ants(left, atlas_affine), template_grid, interp_type="linear"
        )
        right_t = ants.resample_image_to_target(
            to_ants(right, atlas_affine), template_grid, interp_type="linear"
        )
        hippocampus_left = warp(left_t.numpy(), template.affine_ras) * intracranial
        hippocampus_right = warp(right_t.numpy(), template.affine_ras) * intracranial
        inside = ants.apply_transforms(
            fixed=template_grid,
            moving=_like(subject, np.ones(volume.shape, dtype=np.float32)),
            transformlist=inverse,
            whichtoinvert=[True, False],
            interpolator="nearestNeighbor",
            defaultvalue=0,
        ).numpy()
        brain_coverage = float((template.intracranial * inside).sum() / template.intracranial.sum())
        hippocampi = left_t.numpy() + right_t.numpy()
        hippocampus_coverage = float((hippocampi * inside).sum() / max(float(hippocampi.sum()), 1e-6))

    thickness = None
    if options.compute_thickness:
        with _timed(timings, "cortical_thickness", stage):
            if options.thickness_method == "direct":
                thickness = _direct_thickness(
                    corrected_image, labels, gm, wm, intracranial, options.direct_iterations
                )
            else:
                thickness = distance_thickness(labels, volume.spacing_mm)

    return Segmentation(
        volume=volume,
        corrected=corrected.astype(np.float32),
        intracranial=intracranial,
        csf=csf,
        gm=gm,
        wm=wm,
        labels=labels,
        hippocampus_left=hippocampus_left,
        hippocampus_right=hippocampus_right,
        thickness=thickness,
        template_correlation=correlation,
        brain_coverage=brain_coverage,
        hippocampus_coverage=hippocampus_coverage,
        tissue_means=tissue_means,
        atlas=atlas.name,
        timings_s=timings,
    )


def _check_field_of_view(volume: Volume) -> None:
    """Refuse, before any ANTs work, a field of view no brain series has (wrong spacing attributes)."""
    check_field_of_view([n * size for n, size in zip(volume.shape, volume.spacing_mm, strict=True)])


def _n4(subject: ants.ANTsImage, spacing_mm: float) -> ants.ANTsImage:
    """N4 on a coarse copy; the smooth field is interpolated back and divided out at full resolution."""
    import ants  # imported here: see the module note

    low = ants.resample_image(subject, (spacing_mm,) * 3, False, 0)
    low_array = low.numpy()
    head = low_array > 0.1 * float(np.percentile(low_array, 99))
    if head.sum() < 100:
        raise NotBrainT1Error("the volume is almost empty; a T1-weighted brain volume is required")
    field = ants.n4_bias_field_correction(
        low,
        mask=_like(low, head),
        shrink_factor=1,
        convergence={"iters": [20, 20, 10], "tol": 1e-4},
        return_bias_field=True,
    )
    full_field = ants.resample_image_to_target(field, subject, interp_type="linear").numpy()
    data = subject.numpy() / np.maximum(full_field, 1e-3)
    scale = float(np.percentile(data[data > 0], 99)) if np.any(data > 0) else 1.0
    return _like(subject, np.nan_to_num(data / scale))


def _smoothed(corrected: FloatArray, spacing_mm: tuple[float, float, float]) -> FloatArray:
    return np.asarray(ndimage.gaussian_filter(corrected, sigma=[0.7 / s for s in spacing_mm]))


def _intracranial_mask(
    smooth: FloatArray, signed_distance: FloatArray, threshold: float | None = None
) -> npt.NDArray[np.bool_]:
    """Warped template mask trimmed by intensity (drops bone/air) and filled (keeps dark CSF).

    ``smooth`` is the bias-corrected image after ``_smoothed``. ``signed_distance`` is the distance
    (mm) to the warped template mask's surface, negative inside. ``threshold`` is the intensity
    ``smooth`` must exceed; by default 0.2 x the white-matter level, a first guess that
    ``_refine_outer_edge`` replaces once the CSF level is known.
    """
    template_mask = signed_distance <= 0.0
    if not template_mask.any():
        return template_mask
    search = signed_distance <= 5.0
    core = signed_distance < -4.0
    if threshold is None:
        threshold = 0.2 * float(np.percentile(smooth[template_mask], 95))
    mask = (search & (smooth > threshold)) | core
    labelled, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum_labels(mask, labelled, index=np.arange(1, count + 1))
        mask = labelled == (int(np.argmax(sizes)) + 1)
    return np.asarray(ndimage.binary_fill_holes(mask), dtype=bool)


def _refine_outer_edge(
    smooth: FloatArray,
    signed_distance: FloatArray,
    intracranial: npt.NDArray[np.bool_],
    posteriors: tuple[FloatArray, FloatArray, FloatArray],
    csf_level: float,
) -> tuple[npt.NDArray[np.bool_], FloatArray, FloatArray, FloatArray]:
    """Put the mask's outer edge where a boundary voxel is half CSF and half what lies outside.

    The first mask's threshold (0.2 x WM) is a guess. Where it sits below that midpoint, voxels that
    are mostly bone count as CSF, and the reverse. Here the threshold becomes halfway between the
    CSF level the tissue model measured and the median level just outside the mask. Voxels the new
    mask adds are CSF (they are darker than the old edge); voxels it drops leave every class. If
    the levels do not make sense (CSF not brighter than outside), the first mask stays.
    """
    csf, gm, wm = posteriors
    shell = (signed_distance <= 5.0) & ~intracranial
    if not shell.any():
        return intracranial, csf, gm, wm
    outside_level = float(np.median(smooth[shell]))
    if not csf_level > outside_level:
        return intracranial, csf, gm, wm
    refined = _intracranial_mask(smooth, signed_distance, threshold=(csf_level + outside_level) / 2.0)
    dropped = intracranial & ~refined
    added = refined & ~intracranial
    for p in (csf, gm, wm):  # the caller's arrays, updated in place
        p[dropped] = 0.0
        p[added] = 0.0
    csf[added] = 1.0
    return refined, csf, gm, wm


def _check_registration(correlation: float, min_correlation: float) -> None:
    if not np.isfinite(correlation) or correlation < min_correlation:
        raise NotBrainT1Error(
            f"the volume does not match the brain template (correlation {correlation:.2f} after "
            f"registration; at least {min_correlation:.2f} is required): not a brain volume?"
        )


def _check_t1_contrast(means: dict[str, float]) -> None:
    """Classes start from the template priors, so a T2 or FLAIR image ends with CSF not darkest."""
    if not (means["wm"] > means["gm"] > means["csf"]):
        raise NotBrainT1Error(
            "tissue contrast is not T1-weighted (required: white matter brighter than grey matter "
            f"brighter than CSF; found WM {means['wm']:.2f}, GM {means['gm']:.2f}, CSF {means['csf']:.2f} "
            "relative to the 99th percentile)"
        )


def _atropos(
    corrected_image: ants.ANTsImage,
    intracranial: npt.NDArray[np.bool_],
    priors: FloatArray,
    options: PipelineOptions,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """ANTs Atropos with the warped priors (single-threaded here: 30 s at 1 mm on a quiet 2-core machine)."""
    import ants  # imported here: see the module note

    result = ants.atropos(
        a=corrected_image,
        x=_like(corrected_image, intracranial),
        i=[_like(corrected_image, p * intracranial) for p in priors],
        m="[0.1,1x1x1]",
        c=f"[{options.tissue_iterations},0]",
        priorweight=options.atropos_prior_weight,
        verbose=0,
    )
    csf, gm, wm = (
        np.asarray(p.numpy(), dtype=np.float32) * intracranial for p in result["probabilityimages"]
    )
    return csf, gm, wm


def classify_tissue(
    corrected: FloatArray,
    intracranial: npt.NDArray[np.bool_],
    priors: FloatArray,
    prior_weight: float,
    iterations: int,
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Gaussian-mixture EM with spatial priors (Atropos's model without the MRF term), vectorised.

    Class means start from a 1D k-means of the intensities (as Atropos's k-means initialisation),
    so a poor registration cannot swap classes. Posterior_k is proportional to
    ``(PRIOR_FLOOR + prior_k) ** prior_weight * N(intensity; mean_k, sd)`` with one shared
    standard deviation (partial-volume voxels then split at the midpoint between class means).
    """
    intensities = corrected[intracranial].astype(np.float64)
    spatial = priors[:, intracranial].astype(np.float64)
    mixing_log = prior_weight * np.log(PRIOR_FLOOR + spatial)
    mean = np.percentile(intensities, [10.0, 50.0, 90.0])
    for _ in range(20):
        nearest = np.abs(intensities[np.newaxis] - mean[:, np.newaxis]).argmin(axis=0)
        mean = np.array(
            [intensities[nearest == k].mean() if np.any(nearest == k) else mean[k] for k in range(3)]
        )
    sd = float(np.sqrt(np.mean((intensities - mean[nearest]) ** 2)))
    for _ in range(max(iterations, 1)):
        sd = max(sd, 1e-3 * float(intensities.std()) + 1e-9)
        log_posterior = mixing_log - 0.5 * ((intensities[np.newaxis] - mean[:, np.newaxis]) / sd) ** 2
        log_posterior -= log_posterior.max(axis=0, keepdims=True)
        posterior = np.exp(log_posterior)
        posterior /= posterior.sum(axis=0, keepdims=True)
        weight = np.maximum(posterior.sum(axis=1), 1e-9)
        mean = (posterior @ intensities) / weight
        residual = sum((posterior[k] * (intensities - mean[k]) ** 2).sum() for k in range(3))
        sd = float(np.sqrt(residual / intensities.size))
    maps = []
    for k in range(3):
        full = np.zeros(corrected.shape, dtype=np.float32)
        full[intracranial] = posterior[k]
        maps.append(full)
    return maps[0], maps[1], maps[2]


def distance_thickness(labels: npt.NDArray[np.uint8], spacing_mm: tuple[float, float, float]) -> FloatArray:
    """Cortical thickness per GM voxel: distance to white matter plus distance to CSF/outside.

    Both distances are measured between voxel centres, so one voxel edge is subtracted. Exact for
    a flat or spherical layer; overestimates where sulci are buried (no CSF visible between banks).
    """
    grey = labels == 2
    to_white = ndimage.distance_transform_edt(labels != 3, sampling=spacing_mm)
    to_outside = ndimage.distance_transform_edt(labels >= 2, sampling=spacing_mm)
    step = float(np.mean(spacing_mm))
    thickness = np.maximum(to_white + to_outside - step, 0.0)
    ribbon = grey & (thickness <= MAX_CORTICAL_THICKNESS_MM)
    thickness = np.where(ribbon, thickness, 0.0)
    return thickness.astype(np.float32)


def _direct_thickness(
    corrected_image: ants.ANTsImage,
    labels: npt.NDArray[np.uint8],
    gm: FloatArray,
    wm: FloatArray,
    intracranial: npt.NDArray[np.bool_],
    iterations: int,
) -> FloatArray:
    """KellyKapowski on the bounding box of the intracranial mask (saves most of the run time)."""
    import ants  # imported here: see the module note

    box = ndimage.find_objects(intracranial.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in box)
    crop = ants.crop_indices(
        corrected_image,
        [s.start for s in box],
        [min(s.stop, n) for s, n in zip(box, labels.shape, strict=True)],
    )
    thickness = ants.kelly_kapowski(
        s=_like(crop, labels[box]),
        g=_like(crop, gm[box]),
        w=_like(crop, wm[box]),
        its=iterations,
        r=0.025,
        m=1.5,
        verbose=0,
    )
    full = np.zeros(labels.shape, dtype=np.float32)
    full[box] = thickness.numpy()
    return full


def warm_up() -> None:
    """Import ANTsPy and load the template ahead of the first analysis (a worker thread at start)."""
    import ants  # noqa: F401

    mni_template()
