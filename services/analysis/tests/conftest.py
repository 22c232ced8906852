"""Shared fixtures: the expensive pipeline runs happen once per session."""

from __future__ import annotations

import numpy as np
import pytest
from enclave_analysis.measures import BrainVolumetrics, analyse_series
from enclave_analysis.phantoms import HeadPhantom, head_phantom, mni152_volume, write_mr_series
from enclave_analysis.segmentation import PipelineOptions, Segmentation
from enclave_analysis.volume import VolumeLimits

#: An ellipsoid phantom is not a brain: the brain-likeness gate is off and the template priors,
#: which do not fit it, get less weight; the volumes and thickness are what is checked.
PHANTOM_OPTIONS = PipelineOptions(min_template_correlation=-1.0, prior_weight=0.5)


@pytest.fixture(scope="session")
def mni_series() -> list:
    """nilearn's MNI152 2009a T1 as a DICOM MR series (one file per slice)."""
    return write_mr_series(mni152_volume())


@pytest.fixture(scope="session")
def mni_result(mni_series) -> tuple[BrainVolumetrics, Segmentation]:
    """The full pipeline on the template series delivered in shuffled order."""
    order = np.random.default_rng(7).permutation(len(mni_series))
    return analyse_series([mni_series[n] for n in order])


@pytest.fixture(scope="session")
def scaled_mni_result() -> tuple[BrainVolumetrics, Segmentation]:
    """The template shrunk by 0.9 along each axis (determinant 0.729)."""
    return analyse_series(write_mr_series(mni152_volume(scale=0.9)))


@pytest.fixture(scope="session")
def phantom() -> HeadPhantom:
    return head_phantom()


@pytest.fixture(scope="session")
def phantom_series(phantom) -> list:
    return write_mr_series(phantom.volume, patient_name="Phantom^Head", patient_id="PH-1")


@pytest.fixture(scope="session")
def phantom_result(phantom_series) -> tuple[BrainVolumetrics, Segmentation]:
    """The phantom through the same path as a real upload: DICOM series -> volume -> measures."""
    return analyse_series(phantom_series, PHANTOM_OPTIONS)


@pytest.fixture(scope="session")
def reduced_phantom_result(phantom_series) -> tuple[BrainVolumetrics, Segmentation]:
    """The phantom with a voxel budget of a third of its voxels: analysed halved in-plane."""
    first = phantom_series[0]
    voxels = int(first.Rows) * int(first.Columns) * len(phantom_series)
    return analyse_series(phantom_series, PHANTOM_OPTIONS, limits=VolumeLimits(max_voxels=voxels // 3))
