"""Traced labels (inference resolution) -> full image resolution, plus a pyramid for viewing.

``seg_infer.h5`` was segmented on an image mean-pooled by ``downsample_xy`` = f
in y and x. Nearest-neighbour upsampling repeats each label f x f times and
crops to image.h5's shape. ``seg.h5`` holds the result in its dataset
(``contract.DATASET``) and pyramid levels ``s1``..``sN`` (``contract.level_name``),
each 2x smaller in y and x than the one before, by mode (``resampling``).
Everything is done in slabs of a few slices; z is never resampled, so slabs
are independent and memory is bounded by one slab.

seg.h5 is the final product, which labs open in Fiji, MATLAB, ilastik or plain
h5py: it is compressed with gzip level 1 (``io.plain_compression``), which every
HDF5 reader has, not with Blosc, which needs a filter plugin.
``benchmarks/seg_compression.py`` measured the choice against Blosc-LZ4, gzip 4
and no compression (see ``SEG_COMPRESSION``). The traced file's object scores
(``contract.OBJECT_SCORES``, where trace wrote them) are copied into seg.h5 as
they are: each object's mean foreground heat, at the heat's resolution.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from emmito import __version__, contract
from emmito.io import (
    EmmitoError, atomic_path, default_chunks, open_volume, plain_compression, read_table, volume_attrs, write_table,
)
from emmito.resampling import downsample_mode, upsample_labels

# h5py keywords of seg.h5's datasets: readable without a filter plugin.
SEG_COMPRESSION = plain_compression


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


def _create_dataset(f: h5py.File, level: int, shape: tuple[int, ...], voxel_size: list[float], filters: dict[str, Any]) -> h5py.Dataset:
    """uint32 dataset of pyramid level ``level`` (0 = full resolution), chunked as io.create_volume does.

    Its attributes are ``contract.level_attrs`` plus the version, in the order
    io.create_volume writes them (the base keys, then the frame).
    """
    ds = f.create_dataset(
        contract.level_name(level), shape=shape, dtype=np.uint32, chunks=default_chunks(shape),
        track_times=False, fillvalue=0, **filters,
    )
    attrs = {**contract.level_attrs(voxel_size, shape[0], 2**level), contract.VERSION: __version__}
    for key in (*contract.BASE_KEYS, *contract.FRAME_KEYS):
        ds.attrs[key] = attrs[key]
    return ds


@contextlib.contextmanager
def create_seg(
    out: Path, shape: tuple[int, ...], voxel_size: list[float], pyramid_levels: int, filters: dict[str, Any]
) -> Iterator[list[h5py.Dataset]]:
    """Create seg.h5 atomically and yield its datasets, full resolution first, then s1..sN (each halving y and x, ceil)."""
    with atomic_path(out) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            datasets = []
            for level in range(pyramid_levels + 1):
                datasets.append(_create_dataset(f, level, shape, voxel_size, filters))
                shape = (shape[0], -(-shape[1] // 2), -(-shape[2] // 2))
            yield datasets


def upsample_files(
    traced_path: Path,
    image_path: Path,
    out: Path,
    pyramid_levels: int,
    slab_slices: int,
    progress: bool = False,
    filters: dict[str, Any] | None = None,
) -> None:
    """Write ``out`` (seg.h5): uint32 labels at image.h5's shape, plus ``pyramid_levels`` levels mode-downsampled.

    ``filters``: h5py compression keywords (default ``SEG_COMPRESSION()``; the benchmark passes others).
    """
    with open_volume(image_path) as image:
        image_shape = tuple(image.shape)
        image_attrs = volume_attrs(image)
    with open_volume(traced_path) as traced:
        factor = contract.downsample_xy(volume_attrs(traced))
        check_shapes(traced_path, tuple(traced.shape), factor, image_path, image_shape)
        depth = image_shape[0]
        voxel_size = contract.voxel_size(image_attrs)
        filters = SEG_COMPRESSION() if filters is None else filters
        scores = read_table(traced, contract.OBJECT_SCORES, contract.OBJECT_SCORE_COLUMNS)
        with create_seg(out, image_shape, voxel_size, pyramid_levels, filters) as (full, *levels):
            if scores is not None:  # per object, from the heat: the same at any resolution
                write_table(full, contract.OBJECT_SCORES, scores, contract.OBJECT_SCORE_COLUMNS)
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
