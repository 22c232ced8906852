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


def test_a_volume_reduced_in_plane_gets_its_segmentation_on_the_source_matrix(phantom_series):
    """Past the voxel budget the volume is reduced in-plane (build_volume); highdicom refused a label map
    smaller than the source frames, so such a series failed at its report. Each label now covers its
    f x f block of source pixels."""
    from enclave_analysis.measures import analyse_series
    from enclave_analysis.segmentation import PipelineOptions
    from enclave_analysis.volume import VolumeLimits

    phantom_options = PipelineOptions(min_template_correlation=-1.0, prior_weight=0.5)  # as conftest's
    first = phantom_series[0]
    voxels = int(first.Rows) * int(first.Columns) * len(phantom_series)
    _, segmentation = analyse_series(
        phantom_series, phantom_options, limits=VolumeLimits(max_voxels=voxels // 3)
    )
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
