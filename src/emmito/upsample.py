"""Traced labels (inference resolution) -> full image resolution, plus a pyramid for viewing.

``seg_infer.h5`` was segmented on an image mean-pooled by ``downsample_xy`` = f
in y and x. Nearest-neighbour upsampling repeats each label f x f times and
crops to image.h5's shape. ``seg.h5`` holds the result in ``main`` and scales
``s1``..``sN``, each 2x smaller in y and x than the one before, by mode.
Everything is done in slabs of a few slices; z is never resampled, so slabs
are independent and memory is bounded by one slab.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from emmito import __version__
from emmito.io import EmmitoError, compression, create_volume, default_chunks, open_volume, volume_attrs


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


def check_shapes(traced_path: Path, traced_shape: tuple[int, ...], factor: int, image_path: Path, image_shape: tuple[int, ...]) -> None:
    """The traced volume must be the image pooled by ``factor`` (ceil or floor) with the same slices."""
    if len(traced_shape) != 3 or len(image_shape) != 3:
        raise EmmitoError(f"{traced_path} is {traced_shape} and {image_path} is {image_shape}: both must be (z, y, x) volumes")
    fits = traced_shape[0] == image_shape[0] and all(
        small in (full // factor, -(-full // factor)) for small, full in zip(traced_shape[1:], image_shape[1:])
    )
    if not fits:
        raise EmmitoError(
            f"{traced_path} is {traced_shape} at downsample_xy {factor}, which does not fit {image_path} "
            f"{image_shape}: they are of different volumes, or the traced file is stale; rerun trace for this volume"
        )


def upsample_files(
    traced_path: Path, image_path: Path, out: Path, pyramid_levels: int, slab_slices: int, progress: bool = False
) -> None:
    """Write ``out`` (seg.h5): ``main`` uint32 at image.h5's shape, plus ``s1``..``sN`` mode-downsampled."""
    with open_volume(image_path) as image:
        image_shape = tuple(image.shape)
        image_attrs = volume_attrs(image)
    with open_volume(traced_path) as traced:
        traced_attrs = volume_attrs(traced)
        factor = int(traced_attrs.get("downsample_xy", 1))
        check_shapes(traced_path, tuple(traced.shape), factor, image_path, image_shape)
        depth = image_shape[0]
        voxel_size = image_attrs["voxel_size"]
        with create_volume(
            out, image_shape, np.uint32, voxel_size=voxel_size, offset=0,
            attrs={"volume_depth": depth, "downsample_xy": 1},
        ) as main:
            levels = [main]
            shape = image_shape
            for level in range(1, pyramid_levels + 1):
                shape = (depth, -(-shape[1] // 2), -(-shape[2] // 2))
                scale = 2**level
                ds = main.file.create_dataset(
                    f"s{level}", shape=shape, dtype=np.uint32, chunks=default_chunks(shape),
                    track_times=False, fillvalue=0, **compression(),
                )
                ds.attrs["voxel_size"] = np.asarray([voxel_size[0], voxel_size[1] * scale, voxel_size[2] * scale])
                ds.attrs["offset"] = 0
                ds.attrs["emmito_version"] = __version__
                ds.attrs["volume_depth"] = depth
                ds.attrs["downsample_xy"] = scale
                levels.append(ds)
            starts = range(0, depth, slab_slices)
            for z_start in tqdm(starts, desc="upsample", unit="slab", file=sys.stderr, disable=not progress):
                z_stop = min(z_start + slab_slices, depth)
                labels = upsample_labels(traced[z_start:z_stop].astype(np.uint32, copy=False), factor, image_shape[1:])
                main[z_start:z_stop] = labels
                for ds in levels[1:]:
                    labels = downsample_mode(labels)
                    ds[z_start:z_stop] = labels


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito upsample TRACED IMAGE OUT``."""
    section = params["upsample"]
    upsample_files(args.traced, args.image, args.out, section["pyramid_levels"], section["slab_slices"], progress=True)
