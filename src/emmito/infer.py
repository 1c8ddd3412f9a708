"""Inference: the heatmap of one chunk of slices, seamless with its neighbours by construction.

Sliding windows of ``model.patch`` lie on one global grid over the whole volume
(per axis: a constant stride, the grid centred so that its slack is split
between the two ends, where the volume is reflect-padded). A chunk evaluates
exactly the windows that touch its slices, reading the image slices those
windows need (its halo) and nothing else, and blends them with separable
Gaussian weights. Every voxel therefore sees the same windows with the same
inputs whatever the chunking, so chunked inference equals whole-volume
inference (to float rounding of batched convolutions): no seams at chunk faces.

Memory is the chunk plus its halo (a window's depth), never the volume's depth.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from emmito import blocks
from emmito.io import EmmitoError, open_volume, volume_attrs, write_volume
from emmito.model import ARCHITECTURE_KEYS, build_model, check_patch, target_channels

# Added to each 1D Gaussian so that a window's corners still count where nothing else covers a voxel.
BLEND_EPSILON = 1e-3

# How the uint8 input is normalised when a checkpoint does not say: (value - mean) / std.
DEFAULT_INPUT_NORM = {"mean": 127.5, "std": 127.5}


def job_threads(requested: int) -> int:
    """Threads to give torch: ``requested``, or (0) all the cores this job may use (SLURM/taskset aware)."""
    return requested if requested > 0 else len(os.sched_getaffinity(0))


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> Any:
    """Mixed precision on CUDA only: bf16 autocast on this kind of CPU is ~100x slower than fp32."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def window_stride(patch: int, overlap: float) -> int:
    """Stride (voxels) between neighbouring windows of ``patch`` voxels overlapping by the fraction ``overlap``."""
    return max(1, math.floor(patch * (1.0 - overlap) + 1e-9))


def window_starts(size: int, patch: int, stride: int) -> np.ndarray:
    """Starts (int64, may be negative) of the windows covering ``size`` voxels along one axis.

    The fewest windows at this stride that cover the axis; the slack is split
    between both ends, so starts depend only on (size, patch, stride).
    """
    count = 1 if size <= patch else math.ceil((size - patch) / stride) + 1
    span = (count - 1) * stride + patch
    return np.arange(count, dtype=np.int64) * stride - (span - size) // 2


def reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Map virtual indices (any integer) into [0, size) by mirror reflection without repeating the edge (numpy 'reflect')."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    folded = np.mod(index, period)
    return np.where(folded >= size, period - folded, folded)


def _is_identity(index: np.ndarray, size: int) -> bool:
    return len(index) == size and bool(np.all(index == np.arange(size)))


def blend_weights(patch: int, sigma_fraction: float) -> np.ndarray:
    """1D Gaussian blending weights (float64, peak 1 + epsilon) for a window of ``patch`` voxels."""
    centre = (patch - 1) / 2
    sigma = max(sigma_fraction * patch, 1e-6)
    positions = np.arange(patch, dtype=np.float64)
    return np.exp(-0.5 * ((positions - centre) / sigma) ** 2) + BLEND_EPSILON


def _axis_weight_sum(starts: np.ndarray, weights: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Sum over windows of their 1D weights at positions [lo, hi) (float64), windows in ascending order."""
    total = np.zeros(hi - lo, dtype=np.float64)
    patch = len(weights)
    for start in starts:
        a, b = max(start, lo), min(start + patch, hi)
        if a < b:
            total[a - lo : b - lo] += weights[a - start : b - start]
    return total


def mean_pool_xy(slices: np.ndarray, factor: int) -> np.ndarray:
    """Mean-pool (z, y, x) slices by ``factor`` in y and x; returns float32 (z, ceil(y/f), ceil(x/f)).

    A remainder row/column is averaged with edge copies of itself (i.e. over the pixels that exist).
    """
    if factor == 1:
        return slices
    depth, height, width = slices.shape
    pad_y, pad_x = -height % factor, -width % factor
    if pad_y or pad_x:
        slices = np.pad(slices, ((0, 0), (0, pad_y), (0, pad_x)), mode="edge")
    shaped = slices.reshape(depth, slices.shape[1] // factor, factor, slices.shape[2] // factor, factor)
    return shaped.mean(axis=(2, 4), dtype=np.float32)


def _windows(z_starts: np.ndarray, y_starts: np.ndarray, x_starts: np.ndarray) -> Iterator[tuple[int, int, int]]:
    for z in z_starts:
        for y in y_starts:
            for x in x_starts:
                yield int(z), int(y), int(x)


def predict_slices(
    model: torch.nn.Module,
    read_slices: Callable[[int, int], np.ndarray],
    depth: int,
    z_start: int,
    z_stop: int,
    patch: tuple[int, int, int] | list[int],
    overlap: float,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    input_norm: dict[str, float] | None = None,
    blend_sigma: float = 0.125,
    progress: bool = True,
) -> np.ndarray:
    """Blended sigmoid probabilities of slices [z_start, z_stop) of a volume of ``depth`` slices.

    ``read_slices(a, b)`` returns slices [a, b) (0 <= a < b <= depth) as (b - a, y, x)
    intensities on the 0-255 scale (uint8, or float32 after pooling); it is called
    once, for the chunk plus the halo its windows need. ``patch`` is the window
    (z, y, x) in voxels, ``overlap`` the fraction neighbouring windows share,
    ``blend_sigma`` the Gaussian sigma as a fraction of the patch.
    Returns float32 (channel, z_stop - z_start, y, x) in [0, 1].
    """
    if not 0 <= z_start < z_stop <= depth:
        raise ValueError(f"slices [{z_start}, {z_stop}) are not inside a volume of {depth} slices")
    device = torch.device(device)
    norm = input_norm or DEFAULT_INPUT_NORM
    patch_z, patch_y, patch_x = (int(p) for p in patch)

    z_grid = window_starts(depth, patch_z, window_stride(patch_z, overlap))
    z_starts = z_grid[(z_grid < z_stop) & (z_grid + patch_z > z_start)]
    virtual_z = np.arange(z_starts[0], z_starts[-1] + patch_z)
    real_z = reflect_index(virtual_z, depth)
    read_lo, read_hi = int(real_z.min()), int(real_z.max()) + 1
    slab = np.asarray(read_slices(read_lo, read_hi))
    if slab.ndim != 3 or slab.shape[0] != read_hi - read_lo:
        raise ValueError(f"read_slices({read_lo}, {read_hi}) returned shape {slab.shape}, expected ({read_hi - read_lo}, y, x)")
    height, width = slab.shape[1:]

    y_starts = window_starts(height, patch_y, window_stride(patch_y, overlap))
    x_starts = window_starts(width, patch_x, window_stride(patch_x, overlap))
    # The padded slab: rows/columns in virtual (grid) coordinates, reflected at the volume's faces only.
    y_index = reflect_index(np.arange(y_starts[0], y_starts[-1] + patch_y), height)
    x_index = reflect_index(np.arange(x_starts[0], x_starts[-1] + patch_x), width)
    z_index = real_z - read_lo
    if not (_is_identity(z_index, len(slab)) and _is_identity(y_index, height) and _is_identity(x_index, width)):
        slab = slab[np.ix_(z_index, y_index, x_index)]  # one copy, only where padding is needed
    z_origin, y_origin, x_origin = int(virtual_z[0]), int(y_starts[0]), int(x_starts[0])

    weight_z = blend_weights(patch_z, blend_sigma)
    weight_y = blend_weights(patch_y, blend_sigma)
    weight_x = blend_weights(patch_x, blend_sigma)
    weight_3d = torch.from_numpy(
        (weight_z[:, None, None] * weight_y[None, :, None] * weight_x[None, None, :]).astype(np.float32)
    )

    channels = None
    out: np.ndarray | None = None
    windows = list(_windows(z_starts, y_starts, x_starts))
    batches = range(0, len(windows), batch_size)
    model.eval()
    with torch.inference_mode():
        for first in tqdm(batches, desc="infer", unit="batch", file=sys.stderr, disable=not progress, leave=False):
            batch_windows = windows[first : first + batch_size]
            tiles = np.stack(
                [
                    slab[z - z_origin : z - z_origin + patch_z, y - y_origin : y - y_origin + patch_y, x - x_origin : x - x_origin + patch_x]
                    for z, y, x in batch_windows
                ]
            )
            inputs = torch.from_numpy((tiles.astype(np.float32) - norm["mean"]) / norm["std"])[:, None].to(device)
            with autocast(device):
                logits = model(inputs)
            weighted = (torch.sigmoid(logits.float()).cpu() * weight_3d).numpy()
            if out is None:
                channels = weighted.shape[1]
                out = np.zeros((channels, z_stop - z_start, height, width), dtype=np.float32)
            for tile, (z, y, x) in zip(weighted, batch_windows):
                za, zb = max(z, z_start), min(z + patch_z, z_stop)
                ya, yb = max(y, 0), min(y + patch_y, height)
                xa, xb = max(x, 0), min(x + patch_x, width)
                out[:, za - z_start : zb - z_start, ya:yb, xa:xb] += tile[:, za - z : zb - z, ya - y : yb - y, xa - x : xb - x]
    assert out is not None and channels is not None

    # The grid is a product of 1D grids, so the summed weight is the product of 1D sums: no 3D weight buffer.
    total_z = _axis_weight_sum(z_starts, weight_z, z_start, z_stop)
    total_yx = (_axis_weight_sum(y_starts, weight_y, 0, height)[:, None] * _axis_weight_sum(x_starts, weight_x, 0, width)[None, :])
    for z in range(z_stop - z_start):
        out[:, z] /= (total_z[z] * total_yx).astype(np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def to_heat(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities float (any shape) in [0, 1] -> uint8 heat 0..255 (probability * 255, rounded)."""
    return np.rint(np.clip(probabilities, 0.0, 1.0) * 255.0).astype(np.uint8)


def load_checkpoint(
    path: str | os.PathLike, model_cfg: dict[str, Any] | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load ``path`` (written by ``emmito train``) -> (model on ``device`` in eval mode, the checkpoint dict).

    With ``model_cfg``, refuse a checkpoint whose architecture differs from it
    (EmmitoError naming the checkpoint and the key). Missing or corrupt files
    raise a one-line EmmitoError.
    """
    path = Path(path)
    if not path.exists():
        raise EmmitoError(f"{path}: checkpoint not found: run 'emmito train' (or the train rule) first, or fix the path")
    try:
        checkpoint = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a truncated or foreign file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmmitoError(f"{path}: not a readable checkpoint ({first_line[:120]}): it is corrupt or not from emmito; delete it and retrain") from None
    missing = [k for k in ("model_config", "state_dict") if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise EmmitoError(f"{path}: not an emmito checkpoint (no {', '.join(missing)}): retrain with 'emmito train'")
    from emmito.config import section_defaults

    defaults = section_defaults("model")
    trained = {**defaults, **checkpoint["model_config"]}
    if model_cfg is not None:
        for key in ARCHITECTURE_KEYS:
            old, new = trained.get(key, defaults[key]), model_cfg.get(key, defaults[key])
            if old != new:
                raise EmmitoError(
                    f"{path} was trained with model.{key}={_show(old)}, the config says {_show(new)}: retrain or fix the config"
                )
    model = build_model(trained)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise EmmitoError(f"{path}: its weights do not fit its model_config ({str(exc).splitlines()[0][:120]}): the file is corrupt; retrain") from None
    return model.to(device).eval(), checkpoint


def _show(value: Any) -> str:
    return str(list(value)).replace(" ", "") if isinstance(value, (list, tuple)) else str(value)


def infer_chunk(
    model: torch.nn.Module,
    read_slices: Callable[[int, int], np.ndarray],
    depth: int,
    chunk_index: int,
    model_cfg: dict[str, Any],
    infer_cfg: dict[str, Any],
    device: torch.device | str = "cpu",
    input_norm: dict[str, float] | None = None,
) -> tuple[np.ndarray, int]:
    """Heat of inference chunk ``chunk_index``: (uint8 (channel, z, y, x), offset = its first slice).

    ``read_slices(a, b)`` returns full-resolution uint8 slices [a, b); they are
    mean-pooled by ``infer.downsample_xy`` before the network.
    """
    z_start, z_stop = blocks.chunk_range(chunk_index, infer_cfg["chunk_slices"], depth)
    factor = infer_cfg["downsample_xy"]
    probabilities = predict_slices(
        model,
        lambda a, b: mean_pool_xy(read_slices(a, b), factor),
        depth,
        z_start,
        z_stop,
        model_cfg["patch"],
        infer_cfg["tile_overlap"],
        infer_cfg["batch_size"],
        device,
        input_norm=input_norm,
        blend_sigma=infer_cfg["blend_sigma"],
    )
    return to_heat(probabilities), z_start


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito infer IMAGE CHECKPOINT OUT --chunk C``: write the heat file of chunk C."""
    model_cfg, infer_cfg = params["model"], params["infer"]
    check_patch(model_cfg["patch"], model_cfg)
    torch.set_num_threads(job_threads(infer_cfg["threads"]))
    device = pick_device()
    model, checkpoint = load_checkpoint(args.checkpoint, model_cfg, device)
    channels = list(checkpoint.get("channels", target_channels(model_cfg["target"])))

    with open_volume(args.image) as image:
        if image.ndim != 3 or image.dtype != np.uint8:
            raise EmmitoError(f"{args.image}: expected uint8 (z, y, x), found {image.dtype} {image.shape}: rerun 'emmito convert'")
        depth = image.shape[0]
        voxel_size = volume_attrs(image)["voxel_size"]
        heat, offset = infer_chunk(
            model,
            lambda a, b: image[a:b],
            depth,
            args.chunk,
            model_cfg,
            infer_cfg,
            device,
            checkpoint.get("input_norm"),
        )
    factor = infer_cfg["downsample_xy"]
    write_volume(
        args.out,
        heat,
        voxel_size=[voxel_size[0], voxel_size[1] * factor, voxel_size[2] * factor],
        offset=offset,
        attrs={"channels": channels, "volume_depth": depth, "downsample_xy": factor},
    )
