"""``emmito convert``: PNG slices -> ``image.h5`` (uint8) and ``label.h5`` (uint32 instance ids).

Slices are streamed: one PNG is decoded at a time and written into the HDF5
dataset a few slices (one HDF5 chunk deep) at a time, so memory stays at a few
slices whatever the volume's depth. Every check that needs only file names and
PNG headers (slice count, sizes, formats) runs before anything is written, and
both outputs appear only when both are complete.

Binary masks become instances by 3D connected components with
``LABEL_CONNECTIVITY`` = 6 (shared faces only): with z 5x coarser than x/y, two
masks that meet only at an edge or a corner across slices are more often two
mitochondria than one. Components are found slab by slab with cc3d and joined
across slab faces, which equals cc3d on the whole volume (same ids even: both
number components in raster order of their first voxel).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cc3d
import h5py
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from emmito.io import EmmitoError, create_volume, list_slices, png_header, read_png_slice, slice_number

LABEL_CONNECTIVITY = 6
# Voxels per connected-components slab: 32 Mvoxels is ~0.3 GB of uint32 in and out,
# e.g. 2 slices of 4096^2; a thin slab costs only more face joins.
SLAB_VOXELS = 2**25
LABEL_FORMATS = {"binary": "label_binary", "instance": "label_instance", "vast": "label_vast"}

# In-slice neighbours across a z face, per 3D connectivity: (dy, dx) offsets.
_FACE_OFFSETS = {
    6: [(0, 0)],
    18: [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)],
    26: [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
}


def _describe(path: Path) -> str:
    number = slice_number(path)
    return f"slice {number} ({path})" if number is not None else str(path)


def check_slice_sizes(paths: Sequence[Path], what: str) -> tuple[int, int]:
    """The common (height, width) of PNG slices, from their headers only.

    Raises EmmitoError naming the first slice whose size differs from the
    most common one, e.g. ``slice 0417 (path) is 4096x4090 (width x height),
    the others are 4096x4096: crop or pad it``.
    """
    # The context closes the bar before an error message is printed, so the two never share a line.
    with tqdm(paths, desc=f"convert: checking {what} headers", unit="slice", file=sys.stderr, leave=False) as bar:
        sizes = [png_header(path)[:2] for path in bar]
    common = Counter(sizes).most_common(1)[0][0]
    for path, size in zip(paths, sizes):
        if size != common:
            raise EmmitoError(
                f"{what} {_describe(path)} is {size[1]}x{size[0]} (width x height), the others are "
                f"{common[1]}x{common[0]}: crop or pad it"
            )
    return common


def _face_pairs(upper: np.ndarray, lower: np.ndarray, connectivity: int) -> np.ndarray:
    """Pairs (k, 2) of non-zero ids that touch across the face between two adjacent slices."""
    height, width = upper.shape
    pairs = []
    for dy, dx in _FACE_OFFSETS[connectivity]:
        a = upper[max(0, dy) : height + min(0, dy), max(0, dx) : width + min(0, dx)]
        b = lower[max(0, -dy) : height + min(0, -dy), max(0, -dx) : width + min(0, -dx)]
        touching = (a != 0) & (b != 0)
        pairs.append(np.stack([a[touching], b[touching]], axis=1).astype(np.uint64))
    joined = np.concatenate(pairs)
    if not len(joined):
        return joined.reshape(0, 2)
    # Packed 64-bit keys make the unique cheap (see notes/library-speeds.md).
    keys = np.unique((joined[:, 0] << np.uint64(32)) | joined[:, 1])
    return np.stack([keys >> np.uint64(32), keys & np.uint64(0xFFFFFFFF)], axis=1)


def label_components(
    volume: np.ndarray | h5py.Dataset,
    slab_slices: int,
    connectivity: int = LABEL_CONNECTIVITY,
    progress: bool = False,
) -> int:
    """Replace a binary mask (z, y, x) by its 3D connected components, in place.

    ``volume`` is any array that reads and writes z-ranges (a numpy array or an
    h5py dataset, uint32), holding 0 = background, non-zero = foreground. It
    ends holding ids 1..n in raster order of each component's first voxel,
    equal to ``cc3d.connected_components(volume, connectivity)``. Memory: one
    slab of ``slab_slices`` slices plus a table of one uint32 per slab component.
    Returns n.
    """
    if connectivity not in _FACE_OFFSETS:
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity}")
    depth = volume.shape[0]
    starts = range(0, depth, slab_slices)
    steps = tqdm(starts, desc="convert: components", unit="slab", file=sys.stderr, disable=not progress)
    provisional_total = 0
    previous_last: np.ndarray | None = None
    edges: list[np.ndarray] = []
    # Pass 1: components per slab under globally unique provisional ids, plus the
    # pairs of ids that touch across each slab face.
    for start in steps:
        slab = np.asarray(volume[start : start + slab_slices]) != 0
        components, count = cc3d.connected_components(
            slab, connectivity=connectivity, return_N=True, out_dtype=np.uint32
        )
        if provisional_total + count >= 2**32:
            raise EmmitoError("the labels hold more than 4 billion pieces: check that they are binary masks")
        components[components != 0] += np.uint32(provisional_total)
        provisional_total += int(count)
        volume[start : start + slab_slices] = components
        if previous_last is not None:
            edges.append(_face_pairs(previous_last, components[0], connectivity))
        previous_last = components[-1].copy()
        del components, slab
    # Join: components of the graph whose nodes are provisional ids.
    pairs = np.concatenate(edges) if edges else np.zeros((0, 2), np.uint64)
    nodes = provisional_total + 1
    graph = coo_matrix(
        (np.ones(len(pairs), np.int8), (pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64))),
        shape=(nodes, nodes),
    )
    _, group = connected_components(graph, directed=False)
    # Number the groups by their smallest provisional id, i.e. by first voxel in raster order.
    group_ids, first_node, node_group = np.unique(group[1:], return_index=True, return_inverse=True)
    rank = np.empty(len(group_ids), dtype=np.uint32)
    rank[np.argsort(first_node, kind="stable")] = np.arange(1, len(group_ids) + 1, dtype=np.uint32)
    lookup = np.zeros(nodes, dtype=np.uint32)
    lookup[1:] = rank[node_group.ravel()]
    # Pass 2: provisional -> final ids.
    for start in starts:
        volume[start : start + slab_slices] = lookup[np.asarray(volume[start : start + slab_slices])]
    return len(group_ids)


def binary_to_instances(mask: np.ndarray, slab_slices: int = 64, connectivity: int = LABEL_CONNECTIVITY) -> np.ndarray:
    """Binary mask (z, y, x), any dtype -> uint32 instance ids by slabwise 3D connected components."""
    ids = (np.asarray(mask) != 0).astype(np.uint32)
    label_components(ids, slab_slices, connectivity)
    return ids


def _slab_slices(height: int, width: int, chunk_depth: int) -> int:
    slices = max(1, SLAB_VOXELS // max(1, height * width))
    # Whole HDF5 chunks per slab, so each chunk is compressed once per pass.
    return slices // chunk_depth * chunk_depth if slices >= chunk_depth else slices


def _stream_slices(dataset: h5py.Dataset, paths: Sequence[Path], kind: str, shape: tuple[int, int], what: str) -> None:
    """Decode ``paths`` one by one into ``dataset``, one HDF5 chunk depth of slices at a time.

    Writing whole chunks means each compressed chunk is written once, not once per slice.
    """
    chunk_depth = dataset.chunks[0] if dataset.chunks else 1
    buffer = np.zeros((chunk_depth, *shape), dtype=dataset.dtype)
    filled = 0
    with tqdm(paths, desc=f"convert: {what}", unit="slice", file=sys.stderr) as bar:
        for z, path in enumerate(bar):
            pixels = read_png_slice(path, kind)
            if pixels.shape != shape:  # the header said otherwise: the file changed under us
                raise EmmitoError(
                    f"{what} {_describe(path)} decodes to {pixels.shape[1]}x{pixels.shape[0]}, "
                    f"not {shape[1]}x{shape[0]}: re-export it"
                )
            buffer[filled] = pixels
            filled += 1
            if filled == chunk_depth or z == len(paths) - 1:
                dataset[z + 1 - filled : z + 1] = buffer[:filled]
                filled = 0


def convert_stack(
    image_paths: Sequence[Path],
    *,
    voxel_size: Sequence[float],
    image_out: Path | None = None,
    label_paths: Sequence[Path] | None = None,
    label_format: str = "binary",
    label_out: Path | None = None,
) -> dict[str, Any]:
    """Write ``image_out`` (uint8) and/or ``label_out`` (uint32 ids) from ordered PNG slices.

    Checks sizes and counts from PNG headers first; both files appear only if
    both are written in full. Returns a summary (depth, height, width, objects).
    """
    if label_format not in LABEL_FORMATS:
        raise EmmitoError(f"label format {label_format!r} is unknown: use one of {', '.join(LABEL_FORMATS)}")
    if (label_out is None) != (label_paths is None):
        raise EmmitoError("convert: --labels and --label-out go together: give both or neither")
    if image_out is None and label_out is None:
        raise EmmitoError("convert: nothing to write: give --image-out and/or --labels with --label-out")
    height, width = check_slice_sizes(image_paths, "image")
    depth = len(image_paths)
    if label_paths is not None:
        if len(label_paths) != depth:
            raise EmmitoError(
                f"{len(label_paths)} label slices ({label_paths[0].parent}) but {depth} image slices "
                f"({image_paths[0].parent}): give one label slice per image slice"
            )
        label_size = check_slice_sizes(label_paths, "label")
        if label_size != (height, width):
            raise EmmitoError(
                f"label slices ({label_paths[0].parent}) are {label_size[1]}x{label_size[0]} but image slices "
                f"({image_paths[0].parent}) are {width}x{height}: labels must match the images pixel for pixel"
            )
    summary: dict[str, Any] = {"depth": depth, "height": height, "width": width}
    voxel_size = [float(v) for v in voxel_size]
    with _maybe_volume(image_out, (depth, height, width), np.uint8, voxel_size) as images:
        if images is not None:
            _stream_slices(images, image_paths, "image", (height, width), "image")
        with _maybe_volume(label_out, (depth, height, width), np.uint32, voxel_size) as labels:
            if labels is not None and label_paths is not None:
                kind = LABEL_FORMATS[label_format]
                _stream_slices(labels, label_paths, kind, (height, width), "label")
                if label_format == "binary":
                    chunk_depth = labels.chunks[0] if labels.chunks else 1
                    summary["objects"] = label_components(
                        labels, _slab_slices(height, width, chunk_depth), LABEL_CONNECTIVITY, progress=True
                    )
    return summary


def _maybe_volume(path: Path | None, shape: tuple[int, int, int], dtype: Any, voxel_size: list[float]):
    """``create_volume`` when ``path`` is set, else a context that yields None."""
    if path is None:
        return contextlib.nullcontext()
    return create_volume(path, shape, dtype, voxel_size=voxel_size, offset=0)


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito convert --images ... [--labels ... --label-format F] --voxel-size Z Y X --image-out ... [--label-out ...]``."""
    image_out = getattr(args, "image_out", None)
    label_out = getattr(args, "label_out", None)
    image_paths = list_slices(args.images)
    label_paths = list_slices(args.labels) if args.labels else None
    summary = convert_stack(
        image_paths,
        voxel_size=args.voxel_size,
        image_out=Path(image_out) if image_out else None,
        label_paths=label_paths,
        label_format=args.label_format,
        label_out=Path(label_out) if label_out else None,
    )
    objects = f", {summary['objects']} objects" if "objects" in summary else ""
    print(
        f"convert: {summary['depth']} slices of {summary['width']}x{summary['height']}{objects}"
        f" -> {', '.join(str(p) for p in (image_out, label_out) if p)}",
        file=sys.stderr,
    )
