"""Result documents: DICOM SR (TID 1500), DICOM Segmentation and a PNG summary, each as bytes.

SR and SEG are built with highdicom from the (de-identified) source datasets, so they reference
the analysed series. The PNG is drawn with pillow: three orthogonal slices through the
intracranial centre with the tissue and hippocampus overlay, and the measures table.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import highdicom as hd
import nibabel as nib
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from enclave_analysis.errors import AnalysisError
from enclave_analysis.measures import BrainVolumetrics, QualityControl
from enclave_analysis.segmentation import Segmentation
from enclave_analysis.volume import Volume

ALGORITHM_NAME = "Enclave brain volumetrics (ANTs + MNI152 2009a)"
ALGORITHM_VERSION = "1"
MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
_PRIVATE = "99ENCLAVE"

#: Segment number -> (label, SNOMED CT property type); hippocampus overrides tissue where > 0.5.
SEGMENTS: dict[int, tuple[str, hd.sr.CodedConcept]] = {
    1: ("Cerebrospinal fluid", codes.SCT.CerebrospinalFluid),
    2: ("Grey matter", codes.SCT.GrayMatter),
    3: ("White matter", codes.SCT.WhiteMatter),
    4: ("Left hippocampus", codes.SCT.Hippocampus),
    5: ("Right hippocampus", codes.SCT.Hippocampus),
}


def label_map(segmentation: Segmentation) -> npt.NDArray[np.uint8]:
    """Tissue labels (1 CSF, 2 GM, 3 WM) with left/right hippocampus (4/5) painted over."""
    labels = segmentation.labels.copy()
    labels[segmentation.hippocampus_left > 0.5] = 4
    labels[segmentation.hippocampus_right > 0.5] = 5
    return labels


def _single_frame_in_volume_order(datasets: Sequence[Dataset], segmentation: Segmentation) -> list[Dataset]:
    """Source instances sorted like the volume's k axis (by position along the slice normal)."""
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise AnalysisError("DICOM SEG output supports single-frame source series only")
    unique = {str(ds.SOPInstanceUID): ds for ds in datasets}
    normal = segmentation.volume.affine_lps[:3, 2]
    ordered = sorted(
        unique.values(), key=lambda ds: float(np.asarray(ds.ImagePositionPatient, float) @ normal)
    )
    if len(ordered) != segmentation.volume.shape[2]:
        raise AnalysisError("the source instances do not match the analysed volume")
    return ordered


def _on_source_matrix(
    frames: npt.NDArray[np.uint8], source: Dataset, volume: Volume
) -> npt.NDArray[np.uint8]:
    """``frames`` (slices, rows, columns) on the source instances' matrix. A volume reduced in-plane by
    f (``volume.build_volume``, past the voxel budget) labels f x f source pixels per voxel: each label
    is repeated over its block, and the rows and columns the reduction cropped are left unlabelled
    (highdicom needs the frames on the source's matrix)."""
    rows, columns = int(source.Rows), int(source.Columns)
    if frames.shape[1:] == (rows, columns):
        return frames
    row_spacing = float(source.PixelSpacing[0])
    factor = round(volume.spacing_mm[1] / row_spacing) if row_spacing > 0 else 0
    if not 1 < factor <= 4 or frames.shape[1] * factor > rows or frames.shape[2] * factor > columns:
        raise AnalysisError("the analysed volume's matrix does not match the source instances'")
    full = np.zeros((frames.shape[0], rows, columns), dtype=frames.dtype)
    expanded = np.repeat(np.repeat(frames, factor, axis=1), factor, axis=2)
    full[:, : expanded.shape[1], : expanded.shape[2]] = expanded
    return full


def _algorithm() -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME, version=ALGORITHM_VERSION, family=codes.cid7162.ArtificialIntelligence
    )


def segmentation_dicom(datasets: Sequence[Dataset], segmentation: Segmentation) -> bytes:
    """A DICOM Segmentation (binary, 5 segments) of tissue and hippocampus on the source frames."""
    sources = _single_frame_in_volume_order(datasets, segmentation)
    labels = label_map(segmentation)
    frames = _on_source_matrix(np.transpose(labels, (2, 1, 0)), sources[0], segmentation.volume)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.Tissue if number <= 3 else codes.SCT.AnatomicalStructure,
            segmented_property_type=prop,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(),
        )
        for number, (label, prop) in SEGMENTS.items()
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Enclave",
        manufacturer_model_name="enclave-analysis",
        software_versions=ALGORITHM_VERSION,
        device_serial_number="0",
        omit_empty_frames=False,
    )
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()


def _measurement(name: hd.sr.CodedConcept, value: float, unit: hd.sr.CodedConcept) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=value, unit=unit)


def _volume_group(
    tracking: str,
    structure: hd.sr.CodedConcept,
    value: float,
    algorithm: hd.sr.AlgorithmIdentification,
    laterality: hd.sr.CodedConcept | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    site = hd.sr.FindingSite(anatomic_location=structure, laterality=laterality)
    measurement = hd.sr.Measurement(name=codes.SCT.Volume, value=value, unit=MILLILITRE, finding_sites=[site])
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=tracking),
        measurements=[measurement],
        algorithm_id=algorithm,
    )


def _algorithm_sr(qc: QualityControl) -> hd.sr.AlgorithmIdentification:
    """TID 4019 with the volume the measures were computed on as its Algorithm Parameters (DCM
    111002, text): the in-plane reduction (``volume.build_volume``), the analysed shape and voxel size."""
    return hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME, version=ALGORITHM_VERSION, parameters=_analysis_parameters(qc)
    )


def _analysis_parameters(qc: QualityControl) -> list[str]:
    """The volume the measures were computed on, as the SR states it."""
    factor = qc.in_plane_reduction
    how = f"each slice averaged in {factor}x{factor} blocks" if factor > 1 else "none"
    columns, rows, slices = qc.analysed_shape
    size = " x ".join(f"{edge:g}" for edge in qc.analysed_voxel_size_mm)
    return [
        f"in-plane reduction: {factor} ({how})",
        f"analysed volume: {columns} x {rows} x {slices} voxels (columns, rows, slices) of {size} mm",
    ]


def structured_report(datasets: Sequence[Dataset], volumetrics: BrainVolumetrics) -> bytes:
    """A Comprehensive 3D SR holding a TID 1500 measurement report of the available measures."""
    if not datasets:
        raise AnalysisError("a structured report needs the source instances")
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    algorithm = _algorithm_sr(volumetrics.qc)
    volumes = [
        ("intracranial volume", codes.SCT.IntracranialStructure, volumetrics.intracranial_volume, None),
        ("grey matter volume", codes.SCT.GrayMatter, volumetrics.grey_matter_volume, None),
        ("white matter volume", codes.SCT.WhiteMatter, volumetrics.white_matter_volume, None),
        ("CSF volume", codes.SCT.CerebrospinalFluid, volumetrics.csf_volume, None),
        ("brain parenchyma volume", codes.SCT.Brain, volumetrics.brain_parenchyma_volume, None),
        (
            "left hippocampus volume",
            codes.SCT.Hippocampus,
            volumetrics.hippocampal_volume_left,
            codes.SCT.Left,
        ),
        (
            "right hippocampus volume",
            codes.SCT.Hippocampus,
            volumetrics.hippocampal_volume_right,
            codes.SCT.Right,
        ),
        ("total hippocampus volume", codes.SCT.Hippocampus, volumetrics.hippocampal_volume_total, None),
    ]
    for tracking, structure, value, side in volumes:
        if value is not None:
            groups.append(_volume_group(tracking, structure, value, algorithm, side))
    extra: list[hd.sr.Measurement] = []
    if volumetrics.brain_parenchymal_fraction is not None:
        extra.append(
            _measurement(
                hd.sr.CodedConcept("BPF", _PRIVATE, "Brain parenchymal fraction"),
                volumetrics.brain_parenchymal_fraction,
                codes.UCUM.NoUnits,
            )
        )
    if volumetrics.cortical_thickness_mean is not None:
        extra.append(
            _measurement(
                hd.sr.CodedConcept("CTMEAN", _PRIVATE, "Mean cortical thickness"),
                volumetrics.cortical_thickness_mean,
                codes.UCUM.Millimeter,
            )
        )
    extra.append(_measurement(codes.DCM.SignalToNoiseRatio, volumetrics.qc.snr, codes.UCUM.NoUnits))
    extra.append(
        _measurement(
            hd.sr.CodedConcept("CNRGMWM", _PRIVATE, "GM/WM contrast to noise ratio"),
            volumetrics.qc.cnr_gm_wm,
            codes.UCUM.NoUnits,
        )
    )
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(), identifier="whole brain summary and QC"
            ),
            measurements=extra,
            algorithm_id=algorithm,
        )
    )
    observation = hd.sr.ObservationContext(
        observer_person_context=None,
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=generate_uid(), name="enclave-analysis"
            ),
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation,
        procedure_reported=hd.sr.CodedConcept("24590-2", "LN", "MR Brain"),
        imaging_measurements=groups,
    )
    first = datasets[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(datasets),
        content=report,
        series_instance_uid=generate_uid(),
        series_number=902,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Enclave",
        is_complete=True,
        is_final=False,
        series_description="Brain volumetrics",
        institution_name=None,
    )
    del first
    buffer = io.BytesIO()
    sr.save_as(buffer)
    return buffer.getvalue()


_COLOURS = {1: (70, 130, 255), 2: (255, 200, 40), 3: (240, 240, 240), 4: (255, 40, 40), 5: (40, 220, 80)}


def _canonical(array: npt.NDArray[np.generic], affine: npt.NDArray[np.float64]) -> npt.NDArray[np.generic]:
    """Reorient voxel axes to RAS so slices display the same way for any acquisition."""
    transform = nib.orientations.io_orientation(affine)  # type: ignore[no-untyped-call]
    return np.asarray(nib.orientations.apply_orientation(array, transform))  # type: ignore[no-untyped-call]


def _panel(
    grey: npt.NDArray[np.float32], labels: npt.NDArray[np.uint8], size: int, radiological: bool = True
) -> Image.Image:
    """One RAS slice, second axis up; ``radiological`` puts the patient's right on screen left."""
    grey = np.flipud(grey.T)
    labels = np.flipud(labels.T)
    if radiological:
        grey, labels = np.fliplr(grey), np.fliplr(labels)
    base = np.clip(grey / max(float(np.percentile(grey, 99.5)), 1e-6), 0, 1) * 255
    rgb = np.repeat(base[..., np.newaxis], 3, axis=2)
    for label, colour in _COLOURS.items():
        where = labels == label
        alpha = 0.25 if label == 3 else 0.45
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(colour, dtype=np.float64)
    image = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    scale = size / max(image.size)
    return image.resize(
        (max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.Resampling.BILINEAR
    )


def _format(value: float | None, unit: str, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f} {unit}".strip()


def _analysed(qc: QualityControl) -> str:
    """e.g. ``256x256x176 of 1x1x1.2 mm (2x2 in-plane)``; ``(as acquired)`` without a reduction."""
    shape = "x".join(str(n) for n in qc.analysed_shape)
    size = "x".join(f"{edge:.3g}" for edge in qc.analysed_voxel_size_mm)
    factor = qc.in_plane_reduction
    return f"{shape} of {size} mm ({f'{factor}x{factor} in-plane' if factor > 1 else 'as acquired'})"


def png_report(segmentation: Segmentation, volumetrics: BrainVolumetrics, panel_size: int = 256) -> bytes:
    """Axial, coronal and sagittal overlays through the intracranial centre plus the measures."""
    affine = segmentation.volume.affine_ras
    grey = np.asarray(_canonical(segmentation.corrected, affine), dtype=np.float32)
    labels = np.asarray(_canonical(label_map(segmentation), affine), dtype=np.uint8)
    inside = np.argwhere(labels > 0)
    centre = inside.mean(axis=0).astype(int) if inside.size else np.asarray(labels.shape) // 2
    hippocampus = np.argwhere(labels >= 4)
    if hippocampus.size:
        centre[1], centre[2] = hippocampus.mean(axis=0).astype(int)[1:]
    panels = [
        _panel(grey[:, :, centre[2]], labels[:, :, centre[2]], panel_size),
        _panel(grey[:, centre[1], :], labels[:, centre[1], :], panel_size),
        _panel(grey[centre[0], :, :], labels[centre[0], :, :], panel_size, radiological=False),
    ]
    rows = [
        ("Intracranial volume", _format(volumetrics.intracranial_volume, "mL")),
        ("Brain parenchyma", _format(volumetrics.brain_parenchyma_volume, "mL")),
        ("Grey matter", _format(volumetrics.grey_matter_volume, "mL")),
        ("White matter", _format(volumetrics.white_matter_volume, "mL")),
        ("CSF", _format(volumetrics.csf_volume, "mL")),
        ("Brain parenchymal fraction", _format(volumetrics.brain_parenchymal_fraction, "", 3)),
        (
            "Hippocampus left / right",
            f"{_format(volumetrics.hippocampal_volume_left, '')} / "
            f"{_format(volumetrics.hippocampal_volume_right, 'mL')}",
        ),
        ("Hippocampus total", _format(volumetrics.hippocampal_volume_total, "mL", 2)),
        ("Mean cortical thickness", _format(volumetrics.cortical_thickness_mean, "mm", 2)),
        ("QC verdict", volumetrics.qc.verdict.upper()),
        ("SNR / GM-WM CNR", f"{volumetrics.qc.snr:.1f} / {volumetrics.qc.cnr_gm_wm:.2f}"),
        (
            "Coverage / template r",
            f"{volumetrics.qc.brain_coverage:.0%} / {volumetrics.qc.template_correlation:.2f}",
        ),
        ("Voxels analysed", _analysed(volumetrics.qc)),
    ]
    font = ImageFont.load_default()
    line = 16
    table_height = line * (len(rows) + 3)
    width = panel_size * 3
    canvas = Image.new("RGB", (width, panel_size + table_height), (0, 0, 0))
    for n, panel in enumerate(panels):
        canvas.paste(
            panel, (n * panel_size + (panel_size - panel.width) // 2, (panel_size - panel.height) // 2)
        )
    draw = ImageDraw.Draw(canvas)
    y = panel_size + 6
    draw.text((8, y), "Brain volumetrics (research use; see QC)", fill=(255, 255, 255), font=font)
    y += line + 4
    for name, value in rows:
        draw.text((8, y), name, fill=(200, 200, 200), font=font)
        draw.text((width // 2, y), value, fill=(255, 255, 255), font=font)
        y += line
    legend = "  ".join(f"{SEGMENTS[k][0]}" for k in SEGMENTS)
    draw.text((8, y + 2), legend[: width // 6], fill=(150, 150, 150), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
