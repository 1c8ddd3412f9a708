"""Traced labels (inference resolution) -> full image resolution, plus a pyramid for viewing.

``seg_infer.h5`` was segmented on an image mean-pooled by ``downsample_xy`` = f
in y and x. Nearest-neighbour upsampling repeats each label f x f times and
crops to image.h5's shape. ``seg.h5`` holds the result in its dataset
(``contract.DATASET``) and pyramid levels ``s1``..``sN`` (``contract.level_name``),
each 2x smaller in y and x than the one before, by mode (``resampling``).
Everything is done in slabs of a few slices; z is never resampled, so slabs
are independent and memory is bounded by one slab.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from emmito import __version__, contract
from emmito.io import EmmitoError, compression, create_volume, default_chunks, open_volume, volume_attrs
from emmito.resampling import downsample_mode, upsample_labels


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


def create_level(full: h5py.Dataset, level: int, voxel_size: list[float]) -> h5py.Dataset:
    """Pyramid level ``level`` (1, 2, ...) beside the full-resolution dataset ``full``, in the file being written.

    Chunked and compressed as ``io.create_volume`` makes ``full``; its y and x
    are those of the level before halved (ceil), its attributes
    ``contract.level_attrs`` plus the version, in the order create_volume
    writes them.
    """
    shape = tuple(full.shape)
    for _ in range(level):
        shape = (shape[0], -(-shape[1] // 2), -(-shape[2] // 2))
    ds = full.file.create_dataset(
        contract.level_name(level), shape=shape, dtype=np.uint32, chunks=default_chunks(shape),
        track_times=False, fillvalue=0, **compression(),
    )
    attrs = {**contract.level_attrs(voxel_size, shape[0], 2**level), contract.VERSION: __version__}
    for key in (*contract.BASE_KEYS, *contract.FRAME_KEYS):
        ds.attrs[key] = attrs[key]
    return ds


def upsample_files(
    traced_path: Path, image_path: Path, out: Path, pyramid_levels: int, slab_slices: int, progress: bool = False
) -> None:
    """Write ``out`` (seg.h5): uint32 labels at image.h5's shape, plus ``pyramid_levels`` levels mode-downsampled."""
    with open_volume(image_path) as image:
        image_shape = tuple(image.shape)
        image_attrs = volume_attrs(image)
    with open_volume(traced_path) as traced:
        factor = contract.downsample_xy(volume_attrs(traced))
        check_shapes(traced_path, tuple(traced.shape), factor, image_path, image_shape)
        depth = image_shape[0]
        voxel_size = contract.voxel_size(image_attrs)
        with create_volume(
            out, image_shape, np.uint32, voxel_size=voxel_size, offset=0, attrs=contract.volume_frame(depth, 1)
        ) as full:
            levels = [create_level(full, level, voxel_size) for level in range(1, pyramid_levels + 1)]
            starts = range(0, depth, slab_slices)
            for z_start in tqdm(starts, desc="upsample", unit="slab", file=sys.stderr, disable=not progress):
                z_stop = min(z_start + slab_slices, depth)
                labels = upsample_labels(traced[z_start:z_stop].astype(np.uint32, copy=False), factor, image_shape[1:])
                full[z_start:z_stop] = labels
                for ds in levels:
                    labels = downsample_mode(labels)
                    ds[z_start:z_stop] = labels


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito upsample TRACED IMAGE OUT``."""
    section = params["upsample"]
    upsample_files(args.traced, args.image, args.out, section["pyramid_levels"], section["slab_slices"], progress=True)
