"""DICOM SR, DICOM SEG and PNG outputs are valid and carry the measures."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from enclave_analysis.report import label_map, png_report, segmentation_dicom, structured_report
from PIL import Image

pytestmark = pytest.mark.slow


def test_structured_report_is_tid1500_with_the_volumes(phantom_series, phantom_result):
    measures, _ = phantom_result
    sr = pydicom.dcmread(io.BytesIO(structured_report(phantom_series, measures)))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    parsed = hd.sr.srread(io.BytesIO(structured_report(phantom_series, measures)))
    groups = (
        parsed.content.get_volumetric_roi_measurement_groups()
        + parsed.content.get_planar_roi_measurement_groups()
    )
    del groups
    values = [float(item.MeasuredValueSequence[0].NumericValue) for item in _numeric_items(sr)]
    assert any(abs(v - measures.grey_matter_volume) < 1e-3 for v in values)
    assert any(abs(v - measures.hippocampal_volume_total) < 1e-3 for v in values)
    assert sr.StudyInstanceUID == phantom_series[0].StudyInstanceUID


def _numeric_items(dataset):
    for item in dataset.get("ContentSequence", []):
        if item.ValueType == "NUM":
            yield item
        yield from _numeric_items(item)


def test_segmentation_holds_tissue_and_hippocampus_labels(phantom_series, phantom_result):
    _, segmentation = phantom_result
    seg = hd.seg.segread(io.BytesIO(segmentation_dicom(phantom_series, segmentation)))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "Cerebrospinal fluid",
        "Grey matter",
        "White matter",
        "Left hippocampus",
        "Right hippocampus",
    ]
    expected = label_map(segmentation)
    sources = [ds.SOPInstanceUID for ds in sorted(phantom_series, key=lambda d: float(d.SliceLocation))]
    volume = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sources, combine_segments=True, relabel=False, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(volume, np.transpose(expected, (2, 1, 0)))


def test_png_report_is_an_image_with_overlays(phantom_result):
    measures, segmentation = phantom_result
    image = Image.open(io.BytesIO(png_report(segmentation, measures)))
    assert image.format == "PNG" and image.width == 768 and image.height > 256
    pixels = np.asarray(image.convert("RGB")).astype(int)
    panel = pixels[:256]
    coloured = (np.abs(panel[..., 0] - panel[..., 1]) > 40) | (np.abs(panel[..., 1] - panel[..., 2]) > 40)
    assert coloured.sum() > 500


def test_png_axial_panel_is_radiological(phantom_result):
    """Left hippocampus (red overlay) on the screen's right half, right (green) on the left half."""
    measures, segmentation = phantom_result
    pixels = np.asarray(Image.open(io.BytesIO(png_report(segmentation, measures))).convert("RGB")).astype(int)
    axial = pixels[:256, :256]
    red = (axial[..., 0] - axial[..., 1] > 60) & (axial[..., 0] - axial[..., 2] > 60)
    green = (axial[..., 1] - axial[..., 0] > 60) & (axial[..., 1] - axial[..., 2] > 60)
    assert red.sum() > 20 and green.sum() > 20
    assert np.argwhere(red)[:, 1].mean() > 128 > np.argwhere(green)[:, 1].mean()


def test_a_volume_reduced_in_plane_gets_its_segmentation_on_the_source_matrix(
    phantom_series, reduced_phantom_result
):
    """Past the voxel budget the volume is reduced in-plane (build_volume); highdicom refused a label map
    smaller than the source frames, so such a series failed at its report. Each label now covers its
    f x f block of source pixels."""
    first = phantom_series[0]
    _, segmentation = reduced_phantom_result
    reduced = label_map(segmentation)
    assert reduced.shape[:2] == (int(first.Columns) // 2, int(first.Rows) // 2)
    seg = hd.seg.segread(io.BytesIO(segmentation_dicom(phantom_series, segmentation)))
    sources = [ds.SOPInstanceUID for ds in sorted(phantom_series, key=lambda d: float(d.SliceLocation))]
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=sources, combine_segments=True, relabel=False, skip_overlap_checks=True
    )
    assert frames.shape == (len(phantom_series), int(first.Rows), int(first.Columns))
    expected = np.repeat(np.repeat(np.transpose(reduced, (2, 1, 0)), 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(frames[:, : expected.shape[1], : expected.shape[2]], expected)
    assert not frames[:, expected.shape[1] :, :].any() and not frames[:, :, expected.shape[2] :].any()


# ---- the volume the measures were computed on -----------------------------------------------------


def _algorithm_parameters(dataset) -> list[str]:
    """The TEXT items named Algorithm Parameters (DCM 111002, TID 4019) anywhere in an SR."""
    found = []
    for item in dataset.get("ContentSequence", []):
        name = item.ConceptNameCodeSequence[0]
        if item.ValueType == "TEXT" and (name.CodeValue, name.CodingSchemeDesignator) == ("111002", "DCM"):
            found.append(str(item.TextValue))
        found.extend(_algorithm_parameters(item))
    return found


def _run_volumetrics_on(result, series, monkeypatch):
    """``series_analysis.run_volumetrics`` (what the service publishes) on an analysis already run."""
    from enclave_analysis import series_analysis

    monkeypatch.setattr(series_analysis, "analyse_series", lambda datasets, limits: result)
    return series_analysis.run_volumetrics(series)


def test_a_series_reduced_in_plane_reports_its_factor_in_the_qc_and_the_sr(
    phantom_series, reduced_phantom_result, monkeypatch
):
    """The measures of a reduced series are computed on the reduced volume; the result said nothing
    of it (only the log did)."""
    first = phantom_series[0]
    measures, segmentation = reduced_phantom_result
    spacing = [float(first.PixelSpacing[1]), float(first.PixelSpacing[0]), segmentation.volume.spacing_mm[2]]
    assert measures.qc.in_plane_reduction == 2
    _, qc, _, reports = _run_volumetrics_on(reduced_phantom_result, phantom_series, monkeypatch)
    assert qc["in_plane_reduction"] == 2
    assert qc["analysed_shape"] == [int(first.Columns) // 2, int(first.Rows) // 2, len(phantom_series)]
    assert qc["analysed_shape"] == list(segmentation.volume.shape)
    np.testing.assert_allclose(
        qc["analysed_voxel_size_mm"], [2 * spacing[0], 2 * spacing[1], spacing[2]], atol=1e-3
    )
    sr = pydicom.dcmread(io.BytesIO(dict((name, data) for name, _, data in reports)["measurements-sr.dcm"]))
    columns, rows, slices = qc["analysed_shape"]
    size = " x ".join(f"{edge:g}" for edge in qc["analysed_voxel_size_mm"])
    assert set(_algorithm_parameters(sr)) == {  # in every measurement group
        "in-plane reduction: 2 (each slice averaged in 2x2 blocks)",
        f"analysed volume: {columns} x {rows} x {slices} voxels (columns, rows, slices) of {size} mm",
    }


def test_a_series_analysed_at_its_acquired_matrix_reports_a_factor_of_1(
    phantom_series, phantom_result, monkeypatch
):
    first = phantom_series[0]
    _, qc, _, reports = _run_volumetrics_on(phantom_result, phantom_series, monkeypatch)
    assert qc["in_plane_reduction"] == 1
    assert qc["analysed_shape"] == [int(first.Columns), int(first.Rows), len(phantom_series)]
    np.testing.assert_allclose(
        qc["analysed_voxel_size_mm"][:2],
        [float(first.PixelSpacing[1]), float(first.PixelSpacing[0])],
        atol=1e-4,
    )
    sr = pydicom.dcmread(io.BytesIO(dict((name, data) for name, _, data in reports)["measurements-sr.dcm"]))
    parameters = _algorithm_parameters(sr)
    assert "in-plane reduction: 1 (none)" in parameters and len(set(parameters)) == 2
