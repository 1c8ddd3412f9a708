"""The inference window grid: tile size, overlap and border crop per axis, and how ``infer.tile: auto`` picks them.

The network is fully convolutional, so inference windows (tiles) need not be
the training patch. Along each axis a window of ``tile`` voxels counts only its
valid region, ``[crop_lo, tile - crop_hi)``: the border next to the window's
edge, where the receptive field runs into the window's zero padding, is
cropped instead of blended in. Valid regions start at multiples of ``stride``
from the volume's first voxel (window ``k``: ``[k * stride, k * stride +
inner)``, ``inner = tile - crop_lo - crop_hi``), and ``stride = inner * (1 -
overlap)``, so with overlap 0 they tile the axis exactly and each voxel comes
from one window; with overlap they are blended with Gaussian weights over the
valid region (``weights``). Windows at the volume's faces reach past it into
the reflect-padded image.

The grid depends only on the volume's shape and the settings, never on which
slices a job computes, so chunked inference equals whole-volume inference.
``infer.tile: auto`` chooses the settings so that windows cost little beyond
the voxels written:

- z: the valid region is the chunk (``infer.chunk_slices``) and the stride too,
  so a chunk job runs one row of windows and no z-window straddles two chunks;
  the tile is the chunk plus the crop on both sides, rounded up to what the
  network's z-pooling needs (the extra goes into the upper crop).
- y, x: the largest tile whose activations fit ``infer.tile_memory_mb``
  (``window_bytes``, an estimate from the architecture, calibrated on CPU), or
  the whole slice plus the crop if that is smaller; then shrunk to the smallest
  tile that needs as many windows, so that the windows share the slice evenly.

It never looks at the machine (free memory, the GPU), so the same config gives
the same tiles, and the same bytes, everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from emmito.io import EmmitoError
from emmito.model import check_patch, level_settings, patch_divisors

# The grid of releases before 0.6, which training's validation and the tune rule keep: windows of the
# training patch at half overlap, no crop (infer section keys).
PATCH_GRID = {"tile": "patch", "tile_overlap": 0.5, "tile_crop": 0}

# Added to each 1D Gaussian so that a window's corners still count where nothing else covers a voxel.
BLEND_EPSILON = 1e-3

# Bytes of activations per input voxel beyond the skip connections, per channel of the first level (float32):
# measured peak RSS of one window in inference mode on CPU, 218-228 B/voxel for filters [8, 16, 32, 64] and
# 463 for [16, 32, 64, 128] (benchmarks/infer_throughput.py prints it); the estimate below gives 264 and 514.
WORKING_TENSORS = 6
FLOAT_BYTES = 4


def _triple(value: Any, key: str) -> tuple[Any, Any, Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != 3:
            raise EmmitoError(f"{key} is {list(value)}: give one number or three, [z, y, x]")
        return tuple(value)  # type: ignore[return-value]
    return (value, value, value)


def blend_weights(size: int, sigma_fraction: float) -> np.ndarray:
    """1D Gaussian blending weights (float64, peak 1 + epsilon) over ``size`` voxels."""
    centre = (size - 1) / 2
    sigma = max(sigma_fraction * size, 1e-6)
    positions = np.arange(size, dtype=np.float64)
    return np.exp(-0.5 * ((positions - centre) / sigma) ** 2) + BLEND_EPSILON


@dataclass(frozen=True)
class AxisTiling:
    """One axis of the grid: windows of ``tile`` voxels, valid in [crop_lo, tile - crop_hi), ``stride`` apart."""

    tile: int
    stride: int
    crop_lo: int = 0
    crop_hi: int = 0

    def __post_init__(self) -> None:
        if self.tile < 1 or self.crop_lo < 0 or self.crop_hi < 0 or self.inner < 1:
            raise EmmitoError(f"a tile of {self.tile} voxels cannot lose {self.crop_lo} + {self.crop_hi} to its crop: lower infer.tile_crop or raise infer.tile")
        if not 1 <= self.stride <= self.inner:
            raise EmmitoError(f"windows {self.stride} voxels apart with {self.inner} valid would leave gaps: lower infer.tile_overlap's complement")

    @classmethod
    def of(cls, tile: int, overlap: float, crop: int) -> "AxisTiling":
        """A tile of ``tile`` voxels, ``crop`` cropped from each side, valid regions sharing the fraction ``overlap``."""
        return cls(tile, max(1, math.floor((tile - 2 * crop) * (1.0 - overlap) + 1e-9)), crop, crop)

    @property
    def inner(self) -> int:
        return self.tile - self.crop_lo - self.crop_hi

    def count(self, size: int) -> int:
        """Windows along an axis of ``size`` voxels: the fewest whose valid regions cover it."""
        return 1 if size <= self.inner else math.ceil((size - self.inner) / self.stride) + 1

    def starts(self, size: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Starts (int64, may be negative) of the windows whose valid region touches voxels [lo, hi)."""
        hi = size if hi is None else hi
        valid = np.arange(self.count(size), dtype=np.int64) * self.stride
        valid = valid[(valid < hi) & (valid + self.inner > lo)]
        return valid - self.crop_lo

    def weights(self, sigma_fraction: float) -> np.ndarray:
        """1D weights (float64) over the tile: 0 on the crop, Gaussian over the valid region."""
        weights = np.zeros(self.tile, dtype=np.float64)
        weights[self.crop_lo : self.tile - self.crop_hi] = blend_weights(self.inner, sigma_fraction)
        return weights


@dataclass(frozen=True)
class Tiling:
    """The window grid of a volume: one ``AxisTiling`` per axis (z, y, x)."""

    z: AxisTiling
    y: AxisTiling
    x: AxisTiling

    @property
    def axes(self) -> tuple[AxisTiling, AxisTiling, AxisTiling]:
        return (self.z, self.y, self.x)

    @property
    def tile(self) -> tuple[int, int, int]:
        return (self.z.tile, self.y.tile, self.x.tile)

    @classmethod
    def of_patch(cls, patch: Sequence[int], overlap: float | Sequence[float] = 0.5, crop: int | Sequence[int] = 0) -> "Tiling":
        """Windows of ``patch`` (z, y, x) voxels with ``overlap`` and ``crop`` (one value or one per axis)."""
        overlaps = _triple(overlap, "infer.tile_overlap")
        crops = _triple(crop, "infer.tile_crop")
        return cls(*(AxisTiling.of(int(t), float(o), int(c)) for t, o, c in zip(patch, overlaps, crops)))

    def window_count(self, shape: Sequence[int], z_start: int = 0, z_stop: int | None = None) -> int:
        """Windows that slices [z_start, z_stop) of a volume of ``shape`` (z, y, x) need."""
        depth, height, width = shape
        return len(self.z.starts(depth, z_start, depth if z_stop is None else z_stop)) * self.y.count(height) * self.x.count(width)

    def redundancy(self, shape: Sequence[int], z_start: int = 0, z_stop: int | None = None) -> float:
        """Voxels through the network per voxel written, for slices [z_start, z_stop) (without test-time augmentation)."""
        z_stop = shape[0] if z_stop is None else z_stop
        written = (z_stop - z_start) * shape[1] * shape[2]
        return self.window_count(shape, z_start, z_stop) * math.prod(self.tile) / written

    def describe(self) -> str:
        """E.g. ``24x544x544 (crop 2/2, 16/16, 16/16; stride 20, 512, 512)``."""
        tile = "x".join(str(a.tile) for a in self.axes)
        crops = ", ".join(f"{a.crop_lo}/{a.crop_hi}" for a in self.axes)
        strides = ", ".join(str(a.stride) for a in self.axes)
        return f"{tile} (crop {crops}; stride {strides})"


# ---- choosing the tiling -------------------------------------------------------------


def window_bytes(model_cfg: dict[str, Any], tile: Sequence[int], channels: int = 2) -> int:
    """Estimated peak activation memory (bytes) of one window of ``tile`` (z, y, x) in inference mode.

    The skip connections of every level are held while the decoder runs, plus
    about ``WORKING_TENSORS`` tensors of the first level's width and the output
    (probabilities and the running test-time-augmentation mean). float32; under
    CUDA autocast the real figure is lower.
    """
    filters = list(model_cfg["filters"])
    pool_z_from = level_settings(model_cfg)[1]
    voxels = float(math.prod(int(t) for t in tile))
    per_voxel, scale = 0.0, 1.0
    for level, width in enumerate(filters):
        per_voxel += width / scale
        scale *= (2 if level >= pool_z_from else 1) * 4
    per_voxel += WORKING_TENSORS * filters[0] + 2 * channels
    return int(FLOAT_BYTES * per_voxel * voxels)


def _round_up(value: int, divisor: int) -> int:
    return max(divisor, -(-value // divisor) * divisor)


def _round_down(value: int, divisor: int) -> int:
    return max(divisor, value // divisor * divisor)


def _auto_z(chunk_slices: int, crop: int, overlap: float, divisor: int) -> AxisTiling:
    """z: the valid region is the chunk, and so is the stride at overlap 0: a chunk's slices are one row of windows."""
    tile = _round_up(chunk_slices + 2 * crop, divisor)
    stride = max(1, math.floor(chunk_slices * (1.0 - overlap) + 1e-9))
    return AxisTiling(tile, stride, crop, tile - chunk_slices - crop)


def _balanced(size: int, most: int, crop: int, overlap: float, divisor: int) -> AxisTiling:
    """y or x: at most ``most`` voxels; the smallest tile needing as many windows, for an even split of ``size``."""
    whole = _round_up(size + 2 * crop, divisor)
    if whole <= most:  # one window holds the whole axis; the rounding goes into the far crop
        return AxisTiling(whole, max(1, size), crop, whole - size - crop)
    best = AxisTiling.of(most, overlap, crop)
    windows = best.count(size)
    tile = most - divisor
    while tile - 2 * crop >= 1:
        candidate = AxisTiling.of(tile, overlap, crop)
        if candidate.count(size) != windows:
            break
        best, tile = candidate, tile - divisor
    return best


def plan_tiling(model_cfg: dict[str, Any], infer_cfg: dict[str, Any], shape: Sequence[int], channels: int = 2) -> Tiling:
    """The tiling of a volume of ``shape`` (z, y, x, at the inference scale) under ``infer_cfg``.

    ``infer.tile``: ``auto`` (see the module), ``patch`` (the training patch,
    ``model.patch``: the grid of releases before 0.6), or [z, y, x].
    ``infer.tile_overlap`` and ``infer.tile_crop``: one value for every axis or [z, y, x].
    """
    overlaps = [float(o) for o in _triple(infer_cfg["tile_overlap"], "infer.tile_overlap")]
    crops = [int(c) for c in _triple(infer_cfg["tile_crop"], "infer.tile_crop")]
    setting = infer_cfg["tile"]
    if setting == "patch" or isinstance(setting, (list, tuple)):
        tile = list(model_cfg["patch"]) if setting == "patch" else [int(t) for t in setting]
        check_patch(tile, model_cfg, "infer.tile" if setting != "patch" else "model.patch")
        return Tiling.of_patch(tile, overlaps, crops)
    if setting != "auto":
        raise EmmitoError(f"infer.tile is {setting!r}: use auto, patch or [z, y, x]")
    divisors = patch_divisors(model_cfg)
    depth, height, width = (int(s) for s in shape)
    z = _auto_z(min(int(infer_cfg["chunk_slices"]), depth), crops[0], overlaps[0], divisors[0])
    budget = int(infer_cfg["tile_memory_mb"]) * 2**20
    per_slice_voxel = window_bytes(model_cfg, (z.tile, 1, 1), channels)
    area = max(1, budget // per_slice_voxel)  # voxels of one slice of the window
    side = _round_down(math.isqrt(area), divisors[1])
    y = _balanced(height, side, crops[1], overlaps[1], divisors[1])
    x = _balanced(width, _round_down(area // y.tile, divisors[2]), crops[2], overlaps[2], divisors[2])
    return Tiling(z, y, x)


def batch_windows(model_cfg: dict[str, Any], infer_cfg: dict[str, Any], tiling: Tiling, channels: int = 2) -> int:
    """Windows per batch: ``infer.batch_size``, fewer where big tiles would pass ``infer.tile_memory_mb``."""
    budget = int(infer_cfg["tile_memory_mb"]) * 2**20
    return max(1, min(int(infer_cfg["batch_size"]), budget // max(1, window_bytes(model_cfg, tiling.tile, channels))))
