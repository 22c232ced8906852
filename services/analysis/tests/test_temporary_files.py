"""The pipeline leaves nothing in the temporary directory: ANTs wrote each registration's transforms
(~20 MB at 1 mm) under a new name there and nothing removed them, so the analysis pod's temporary
volume (an emptyDir with a size limit in deploy/k8s) filled up after a few hundred analyses and the
pod was evicted mid-analysis."""

from __future__ import annotations

import tempfile

from enclave_analysis.measures import analyse_series
from enclave_analysis.segmentation import PipelineOptions


def test_an_analysis_leaves_no_files_in_the_temporary_directory(phantom_series, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    analyse_series(phantom_series, PipelineOptions(min_template_correlation=-1.0, prior_weight=0.5))
    assert sorted(p.name for p in tmp_path.iterdir()) == []
