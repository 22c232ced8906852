"""Fast checks of the hand-written parts: tissue EM and distance thickness."""

from __future__ import annotations

import numpy as np
import pytest
from enclave_analysis.segmentation import classify_tissue, distance_thickness


def test_em_recovers_three_intensity_classes_despite_wrong_priors():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, (30, 30, 30))
    image = np.choose(truth, [0.3, 0.6, 0.85]) + rng.normal(0, 0.02, truth.shape)
    mask = np.ones(truth.shape, dtype=bool)
    wrong = np.stack([np.full(truth.shape, 0.1), np.full(truth.shape, 0.1), np.full(truth.shape, 0.8)])
    csf, gm, wm = classify_tissue(image.astype(np.float32), mask, wrong.astype(np.float32), 2.0, 5)
    labels = np.argmax(np.stack([csf, gm, wm]), axis=0)
    assert (labels == truth).mean() > 0.99


def test_distance_thickness_of_a_flat_layer():
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[:, :, :8] = 3
    labels[:, :, 8:11] = 2
    labels[:, :, 11:15] = 1
    thickness = distance_thickness(labels, (1.0, 1.0, 1.0))
    assert thickness[labels == 2].mean() == pytest.approx(3.0, abs=1e-6)
    half = distance_thickness(labels, (0.5, 0.5, 0.5))
    assert half[labels == 2].mean() == pytest.approx(1.5, abs=1e-6)


def test_deep_grey_matter_is_not_counted_as_cortex():
    labels = np.full((30, 30, 30), 3, dtype=np.uint8)
    labels[5:25, 5:25, 5:25] = 2
    assert distance_thickness(labels, (1.0, 1.0, 1.0)).max() == 0.0
