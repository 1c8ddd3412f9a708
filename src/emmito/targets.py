"""Training targets from instance labels, and the map from network outputs back to probabilities.

Three targets, chosen by ``model.target``:

- ``binary``: one channel, 1 inside instances, 0 on background and where two
  different instances touch (so that the watershed can split them).
- ``binary_contour`` (PyTorch Connectomics' "BC"): channel 0 the foreground (without
  the touching-border cut: the contour channel separates instances), channel 1
  the instance edges, per slice, dilated in-plane by a disk of radius ``contour_width``.
- ``skeleton_distance`` (the original pipeline's target): per slice and
  instance, the distance d to the instance's 2D skeleton, divided by the
  instance's largest such distance (at least 2), mapped to ``1 - d**0.8``
  inside and -1 outside; the network's tanh output regresses it.
"""

from __future__ import annotations

import edt
import numpy as np
import torch
from scipy import ndimage
from skimage.morphology import skeletonize

TARGET_CHANNELS = {
    "binary": ["foreground"],
    "binary_contour": ["foreground", "contour"],
    "skeleton_distance": ["skeleton_distance"],
}

# The original pipeline's skeleton-distance exponent and smallest normaliser (voxels).
SKELETON_ALPHA = 0.8
SKELETON_MIN_NORMALISER = 2.0


def target_channels(target: str) -> list[str]:
    """Names of the output channels target ``target`` predicts (``binary`` -> ``["foreground"]``)."""
    return list(TARGET_CHANNELS[target])


def touching_border(label: np.ndarray) -> np.ndarray:
    """bool mask of labelled voxels that have a face neighbour (6-connectivity) with a different non-zero id.

    Both sides are marked, so the border between two touching instances is two voxels thick.
    """
    border = np.zeros(label.shape, dtype=bool)
    for axis in range(label.ndim):
        low = [slice(None)] * label.ndim
        high = [slice(None)] * label.ndim
        low[axis], high[axis] = slice(None, -1), slice(1, None)
        a, b = label[tuple(low)], label[tuple(high)]
        differ = (a != b) & (a != 0) & (b != 0)
        border[tuple(low)] |= differ
        border[tuple(high)] |= differ
    return border


def binary_target(label: np.ndarray) -> np.ndarray:
    """uint8 target (same shape as ``label``): 1 inside instances, 0 on background and on touching borders."""
    return ((label != 0) & ~touching_border(label)).astype(np.uint8)


def instance_edges_2d(label: np.ndarray) -> np.ndarray:
    """bool (z, y, x): labelled voxels with an in-plane 4-neighbour of another id (background included)."""
    edges = np.zeros(label.shape, dtype=bool)
    for axis in (1, 2):
        low = [slice(None)] * 3
        high = [slice(None)] * 3
        low[axis], high[axis] = slice(None, -1), slice(1, None)
        a, b = label[tuple(low)], label[tuple(high)]
        differ = a != b
        edges[tuple(low)] |= differ & (a != 0)
        edges[tuple(high)] |= differ & (b != 0)
    return edges


def contour_target(label: np.ndarray, width: int) -> np.ndarray:
    """uint8 (z, y, x): instance edges per slice, dilated in-plane by a disk of radius ``width`` voxels (0 = edges only)."""
    edges = instance_edges_2d(label)
    if width > 0:
        edges = ndimage.binary_dilation(edges, disk(width)[None])
    return edges.astype(np.uint8)


def disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return yy**2 + xx**2 <= radius**2


def skeleton_distance_target(label: np.ndarray) -> np.ndarray:
    """float32 (z, y, x) in [-1, 1]: ``1 - (d / max(d_max, 2)) ** 0.8`` inside instances, -1 outside.

    d is the in-plane Euclidean distance (voxels) to the instance's skeleton in
    that slice, d_max its largest value over the instance in that slice.
    """
    out = np.full(label.shape, -1.0, dtype=np.float32)
    for z in range(label.shape[0]):
        plane = label[z]
        objects = ndimage.find_objects(plane.astype(np.int64)) if plane.any() else []
        for index, box in enumerate(objects, start=1):
            if box is None:
                continue
            # One voxel of margin so that the skeleton of an object touching the box edge is well defined.
            box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
            mask = plane[box] == index
            if not mask.any():
                continue
            skeleton = skeletonize(mask)
            if not skeleton.any():  # a one- or two-pixel object: its own skeleton
                skeleton = mask
            distance = edt.edt(~skeleton, black_border=False).astype(np.float32)
            normaliser = max(float(distance[mask].max()), SKELETON_MIN_NORMALISER)
            energy = 1.0 - (distance / normaliser) ** SKELETON_ALPHA
            region = out[z][box]
            region[mask] = energy[mask]
    return out


def make_target(label: np.ndarray, target: str, contour_width: int = 2) -> np.ndarray:
    """float32 (channel, z, y, x) training target of kind ``target`` for uint32 instance ids (z, y, x)."""
    if target == "binary":
        return binary_target(label)[None].astype(np.float32)
    if target == "binary_contour":
        foreground = (label != 0).astype(np.float32)
        return np.stack([foreground, contour_target(label, contour_width).astype(np.float32)])
    if target == "skeleton_distance":
        return skeleton_distance_target(_consecutive_2d_ids(label))[None]
    raise ValueError(f"unknown target {target!r}; expected one of {sorted(TARGET_CHANNELS)}")


def _consecutive_2d_ids(label: np.ndarray) -> np.ndarray:
    """Per slice, ids renumbered 1..n (find_objects indexes by id, so large ids would waste memory)."""
    out = np.zeros(label.shape, dtype=np.int64)
    for z in range(label.shape[0]):
        _, inverse = np.unique(label[z], return_inverse=True)
        ids = inverse.reshape(label[z].shape)
        # np.unique sorts, so background 0 (when present) stays 0.
        out[z] = ids if (label[z] == 0).any() else ids + 1
    return out


def output_to_probability(logits: torch.Tensor, target: str) -> torch.Tensor:
    """Network output (batch, channel, z, y, x) -> values in [0, 1] to store as heat (x255).

    sigmoid for ``binary`` and ``binary_contour``; (tanh + 1) / 2 for
    ``skeleton_distance`` (so heat 128 is the object boundary, 255 the skeleton).
    """
    if target == "skeleton_distance":
        return (torch.tanh(logits) + 1.0) * 0.5
    return torch.sigmoid(logits)
