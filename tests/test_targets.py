"""Training targets: binary with touching borders cut, BC contours, the skeleton-distance target, output maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emmito.targets import (
    binary_target,
    contour_target,
    make_target,
    output_to_probability,
    skeleton_distance_target,
    target_channels,
)


def two_touching() -> np.ndarray:
    label = np.zeros((1, 5, 8), np.uint32)
    label[0, 1:4, 1:4] = 1
    label[0, 1:4, 4:7] = 2
    return label


def test_binary_target_cuts_touching_borders_only():
    target = binary_target(two_touching())
    assert target[0, 2].tolist() == [0, 1, 1, 0, 0, 1, 1, 0]
    assert target.sum() == 12


def test_contour_marks_instance_edges_and_dilates_by_width():
    label = two_touching()
    edges = contour_target(label, 0)[0]
    # A 3x3 object's edge is all but its centre; both objects' edges, including the shared face.
    assert edges.sum() == 16
    assert edges[2, 2] == 0 and edges[2, 5] == 0 and edges[2, 3] == 1 and edges[2, 4] == 1
    assert edges[0].sum() == 0  # background is not an edge at width 0
    wide = contour_target(label, 1)[0]
    assert wide[0, 1:7].all() and wide.sum() > edges.sum()  # dilation reaches one voxel outside
    bc = make_target(label, "binary_contour", 0)
    assert bc.shape == (2, 1, 5, 8) and bc.dtype == np.float32
    assert bc[0].sum() == 18 and np.array_equal(bc[1], edges[None].astype(np.float32))


def test_skeleton_distance_is_one_on_the_skeleton_minus_one_outside_and_follows_the_power_law():
    label = np.zeros((1, 9, 21), np.uint32)
    label[0, 2:7, 2:19] = 3  # a 5 x 17 bar: its skeleton is the middle row
    energy = skeleton_distance_target(label)[0]
    assert energy.dtype == np.float32
    assert np.all(energy[label[0] == 0] == -1.0)
    assert energy[4, 10] == pytest.approx(1.0)  # on the skeleton (the middle row)
    # The farthest voxel from the skeleton has d = d_max, so 1 - 1 = 0 there, and nothing inside is lower.
    assert energy[label[0] > 0].min() == pytest.approx(0.0, abs=1e-6)
    # One and two rows off the skeleton: (1 - e1) / (1 - e2) = (1/2)^0.8 whatever d_max is.
    assert (1 - energy[3, 10]) / (1 - energy[2, 10]) == pytest.approx(0.5**0.8, rel=1e-5)
    # The normaliser is floored at 2: in a 2-wide bar one row is the skeleton and the other has
    # d = d_max = 1, which gets 1 - (1/2)^0.8 rather than 0.
    bar = np.zeros((1, 4, 11), np.uint32)
    bar[0, 1:3, 1:10] = 1
    rows = skeleton_distance_target(bar)[0, 1:3, 1:10]
    assert sorted({round(float(v), 6) for v in rows.ravel()}) == [round(1 - 0.5**0.8, 6), 1.0]
    assert make_target(label, "skeleton_distance").shape == (1, 1, 9, 21)


def test_outputs_map_to_probabilities_per_target():
    logits = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.allclose(output_to_probability(logits, "binary"), torch.sigmoid(logits))
    assert torch.allclose(output_to_probability(logits, "skeleton_distance"), (torch.tanh(logits) + 1) / 2)
    assert output_to_probability(torch.tensor([0.0]), "skeleton_distance").item() == 0.5
    assert target_channels("binary_contour") == ["foreground", "contour"]
    with pytest.raises(ValueError, match="unknown target"):
        make_target(two_touching(), "affinity")
