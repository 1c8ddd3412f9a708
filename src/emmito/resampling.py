"""Resampling in y and x: mean pooling of images, mode pooling and nearest upsampling of labels.

One implementation each, shared by infer and train (the network sees images
pooled exactly alike), upsample and export (the same label pyramid), and report.
``pooling_factor`` chooses the pooling that brings a volume's voxels to the size
a network was trained at (infer and fine-tuning share it).
"""

from __future__ import annotations

import math

import numpy as np

# The y/x pooling factors a volume may be brought to a network's voxel size with.
POOLING_FACTORS = (1, 2, 4, 8)
# How far (relative, in y and in x) the pooled voxels may stay from the trained ones.
POOLING_TOLERANCE = 0.25


def pooling_mismatch(voxel_yx: tuple[float, float] | list[float], trained_yx: tuple[float, float] | list[float], factor: int) -> float:
    """Relative difference between ``voxel_yx`` pooled by ``factor`` and ``trained_yx``: the larger of y's and x's."""
    return max(abs(size * factor - trained) / trained for size, trained in zip(voxel_yx, trained_yx))


def pooling_factor(
    voxel_yx: tuple[float, float] | list[float],
    trained_yx: tuple[float, float] | list[float],
    factors: tuple[int, ...] = POOLING_FACTORS,
    tolerance: float = POOLING_TOLERANCE,
) -> int | None:
    """The factor of ``factors`` whose pooling brings voxels of (y, x) nm ``voxel_yx`` nearest ``trained_yx`` nm.

    Nearest: the smallest ``pooling_mismatch`` (ties go to the smaller factor).
    None when even that one misses by more than ``tolerance``: the volume is
    too coarse for the network (no pooling makes voxels smaller), or between
    two factors. 4 nm voxels and an 8 nm network give 2; 12 nm and 8 nm give None.
    """
    if min(voxel_yx) <= 0 or min(trained_yx) <= 0:
        raise ValueError(f"voxel sizes must be positive: {list(voxel_yx)}, {list(trained_yx)}")
    best = min(factors, key=lambda factor: (pooling_mismatch(voxel_yx, trained_yx, factor), factor))
    return best if pooling_mismatch(voxel_yx, trained_yx, best) <= tolerance + 1e-9 else None


def pooled_shape(shape: tuple[int, ...] | list[int], factor: int) -> tuple[int, int, int]:
    """(z, y, x) of a full-resolution volume of ``shape`` after ``mean_pool_xy`` by ``factor`` (partial edge windows kept)."""
    depth, height, width = (int(s) for s in shape)
    return depth, -(-height // factor), -(-width // factor)


def mean_pool_xy(slices: np.ndarray, factor: int) -> np.ndarray:
    """Mean-pool (z, y, x) slices by ``factor`` in y and x; returns float32 (z, ceil(y/f), ceil(x/f)).

    A remainder row/column is averaged with edge copies of itself (i.e. over the pixels that exist).
    ``factor`` 1 returns ``slices`` unchanged.
    """
    if factor == 1:
        return slices
    depth, height, width = slices.shape
    pad_y, pad_x = -height % factor, -width % factor
    if pad_y or pad_x:
        slices = np.pad(slices, ((0, 0), (0, pad_y), (0, pad_x)), mode="edge")
    shaped = slices.reshape(depth, slices.shape[1] // factor, factor, slices.shape[2] // factor, factor)
    return shaped.mean(axis=(2, 4), dtype=np.float32)


def mean_downsample(image: np.ndarray) -> np.ndarray:
    """2x downsampling in y and x by mean: uint8 (z, y, x) -> uint8 (z, ceil(y/2), ceil(x/2)).

    An odd edge averages only the voxels that exist (no dark border). Rounds
    half up, so the result is exact integer arithmetic and independent of the
    platform.
    """
    z, y, x = image.shape
    pad_y, pad_x = y % 2, x % 2
    padded = np.pad(image.astype(np.uint16), ((0, 0), (0, pad_y), (0, pad_x)))
    total = padded[:, 0::2, 0::2] + padded[:, 1::2, 0::2] + padded[:, 0::2, 1::2] + padded[:, 1::2, 1::2]
    counts = np.full(total.shape[1:], 4, dtype=np.uint16)
    if pad_y:
        counts[-1, :] //= 2
    if pad_x:
        counts[:, -1] //= 2
    return ((total + counts // 2) // counts).astype(np.uint8)


def downsample_mode(labels: np.ndarray) -> np.ndarray:
    """2x downsampling in y and x by mode: uint32 (z, y, x) -> uint32 (z, ceil(y/2), ceil(x/2)).

    Each output voxel is the most frequent non-zero label of its 2x2 input
    voxels. Background wins only when all four are 0, so a thin object does
    not vanish at coarse scales. Ties go to the smallest label, which makes
    the result independent of the voxels' order. An odd edge is padded with 0
    (ignored by the rule above).
    """
    z, y, x = labels.shape
    if y % 2 or x % 2:
        labels = np.pad(labels, ((0, 0), (0, y % 2), (0, x % 2)))
    corners = [labels[:, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)]
    best = np.zeros(corners[0].shape, dtype=labels.dtype)
    best_count = np.zeros(corners[0].shape, dtype=np.uint8)
    for candidate in corners:
        count = np.zeros(candidate.shape, dtype=np.uint8)
        for other in corners:
            count += candidate == other
        count[candidate == 0] = 0
        better = (count > best_count) | ((count == best_count) & (count > 0) & (candidate < best))
        best[better] = candidate[better]
        best_count[better] = count[better]
    return best


def mode_pool_xy(labels: np.ndarray, factor: int) -> np.ndarray:
    """Labels pooled by a power-of-two ``factor`` in y and x: ``downsample_mode`` applied log2(factor) times."""
    for _ in range(int(round(math.log2(factor)))):
        labels = downsample_mode(labels)
    return labels


def pool_pair(image: np.ndarray, label: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8, label uint32) (z, y, x) -> the inference scale: image mean-pooled by ``factor`` in y, x
    (float32 0-255, exactly as ``infer`` pools), label mode-pooled (uint32, ceil(y/factor), ceil(x/factor)).
    ``factor`` 1 returns both unchanged.
    """
    if factor == 1:
        return image, label
    return mean_pool_xy(image, factor), mode_pool_xy(label, factor)


def upsample_labels(labels: np.ndarray, factor: int, shape_yx: tuple[int, int]) -> np.ndarray:
    """Repeat each label ``factor`` x ``factor`` times in y and x, then fit to ``shape_yx``.

    ``labels``: uint32 (z, y, x). Returns uint32 (z, *shape_yx). The result is
    cropped when the image was not divisible by ``factor`` (ceil pooling), and
    padded by repeating the last row/column when pooling dropped the remainder
    (floor pooling), so that border pixels take their nearest label.
    """
    if factor > 1:
        labels = np.repeat(np.repeat(labels, factor, axis=1), factor, axis=2)
    labels = labels[:, : shape_yx[0], : shape_yx[1]]
    pad_y, pad_x = shape_yx[0] - labels.shape[1], shape_yx[1] - labels.shape[2]
    if pad_y or pad_x:
        labels = np.pad(labels, ((0, 0), (0, pad_y), (0, pad_x)), mode="edge")
    return labels
