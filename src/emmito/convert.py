"""``emmito convert``: images and labels in any input format -> ``image.h5`` (uint8) and ``label.h5`` (uint32 ids).

The inputs are emmito.sources specs: PNG or TIFF slices, a TIFF stack, an HDF5
dataset, a zarr or N5 array. They are streamed: a slab of slices (whole HDF5
chunks of the output, whole storage chunks of the input) is read and written at
a time, so memory stays at a slab whatever the volume's depth. Every check that
needs only names, headers and metadata (slice count, sizes, formats) runs before
anything is written, then the intensity mapping is chosen (16-bit and float
images: one linear map to uint8 for the whole volume, from percentiles of a
sample of slices; 8-bit images as they are), and both outputs appear only when
both are complete.

Binary masks become instances by 3D connected components with
``LABEL_CONNECTIVITY`` = 6 (shared faces only): with z 5x coarser than x/y, two
masks that meet only at an edge or a corner across slices are more often two
mitochondria than one. Components are found slab by slab with cc3d and joined
across slab faces, which equals cc3d on the whole volume (same ids even: both
number components in raster order of their first voxel).

Partly labelled volumes (a proofread crop: ``labels_offset`` and/or ``valid``):
the labels may be a crop of the images, placed at ``labels_offset`` (z, y, x);
label.h5 keeps the images' full shape, 0 outside the crop, and holds a second
dataset ``contract.VALID_MASK`` (uint8, 1 where the labels are known: inside
the crop where the ``valid`` source is non-zero, or the whole crop without
one) with the bounding box of its 1s as the attribute ``contract.VALID_BOX``
on the main dataset. Labels inside the crop but outside the mask are kept as
given (training reads none of them: ``train.PatchSampler``). A label.h5
without the mask is labelled everywhere, and is written exactly as before.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cc3d
import h5py
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from emmito import contract, sources
from emmito.config import section_defaults
from emmito.io import EmmitoError, compression, create_volume
from emmito.sources import IntensityMapping, Source, choose_mapping, open_source

LABEL_CONNECTIVITY = 6
# Voxels per connected-components slab: 32 Mvoxels is ~0.3 GB of uint32 in and out,
# e.g. 2 slices of 4096^2; a thin slab costs only more face joins.
SLAB_VOXELS = 2**25
LABEL_FORMATS = ("binary", "instance", "vast")

# In-slice neighbours across a z face, per 3D connectivity: (dy, dx) offsets.
_FACE_OFFSETS = {
    6: [(0, 0)],
    18: [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)],
    26: [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
}


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


Spec = str | os.PathLike | Sequence[Path] | Source


def _open(spec: Spec, kind: str) -> Source:
    return spec if isinstance(spec, Source) else open_source(spec, kind)


def _stream(
    dataset: h5py.Dataset, source: Source, what: str, transform: Any = None, offset: Sequence[int] | None = None
) -> None:
    """Copy ``source`` into ``dataset`` slab by slab (whole output chunks, so each is compressed once).

    ``offset`` (z, y, x): where the source's first voxel lands in ``dataset`` (a crop); None: the whole dataset.
    """
    chunk_depth = dataset.chunks[0] if dataset.chunks else 1
    depth, height, width = source.shape
    step = sources.slab_slices(source.chunk_slices, height, width, np.dtype(source.dtype).itemsize, chunk_depth)
    with tqdm(total=depth, desc=f"convert: {what}", unit="slice", file=sys.stderr) as bar:
        for z0 in range(0, depth, step):
            z1 = min(depth, z0 + step)
            slab = source.read(z0, z1)
            values = transform(slab) if transform is not None else slab
            if offset is None:
                dataset[z0:z1] = values
            else:
                oz, oy, ox = offset
                dataset[oz + z0 : oz + z1, oy : oy + height, ox : ox + width] = values
            bar.update(z1 - z0)


def _stream_valid(
    dataset: h5py.Dataset, valid: Source | None, crop: tuple[int, int, int], offset: Sequence[int]
) -> tuple[list[int], int]:
    """Write the valid mask (1 inside the crop where ``valid`` is non-zero, or the whole crop) slab by slab.

    Returns the bounding box of the 1s in ``dataset``'s coordinates, [z0, y0, x0, z1, y1, x1]
    (end-exclusive; all 0 when there are none), and their count.
    """
    chunk_depth = dataset.chunks[0] if dataset.chunks else 1
    depth, height, width = crop
    itemsize = np.dtype(valid.dtype).itemsize if valid is not None else 1
    step = sources.slab_slices(valid.chunk_slices if valid is not None else 1, height, width, itemsize, chunk_depth)
    oz, oy, ox = offset
    low, high = [depth, height, width], [0, 0, 0]
    count = 0
    with tqdm(total=depth, desc="convert: valid mask", unit="slice", file=sys.stderr) as bar:
        for z0 in range(0, depth, step):
            z1 = min(depth, z0 + step)
            if valid is None:
                mask = np.ones((z1 - z0, height, width), np.uint8)
            else:
                mask = (valid.read(z0, z1) != 0).astype(np.uint8)
            dataset[oz + z0 : oz + z1, oy : oy + height, ox : ox + width] = mask
            ones = int(np.count_nonzero(mask))
            if ones:
                count += ones
                for axis, start in ((0, z0), (1, 0), (2, 0)):
                    present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
                    low[axis] = min(low[axis], start + int(present[0]))
                    high[axis] = max(high[axis], start + int(present[-1]) + 1)
            bar.update(z1 - z0)
    if not count:
        return [0] * 6, 0
    return [o + v for o, v in zip(offset, low)] + [o + v for o, v in zip(offset, high)], count


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def _check_together(
    images: Source, labels: Source | None, offset: Sequence[int] | None = None, valid: Source | None = None
) -> None:
    """Labels match the images slice for slice and pixel for pixel; or, at ``offset``, fit inside them.

    ``valid`` (the valid mask's source) has the labels' shape.
    """
    if labels is None:
        return
    if valid is not None and tuple(valid.shape) != tuple(labels.shape):
        raise EmmitoError(
            f"the valid mask ({valid.name}) is {_dims(valid.shape)} but the labels ({labels.name}) are "
            f"{_dims(labels.shape)} (z x y x x): give the valid mask the labels' shape (one value per label voxel, non-zero = labelled)"
        )
    if offset is not None:
        if any(o + s > i for o, s, i in zip(offset, labels.shape, images.shape)):
            raise EmmitoError(
                f"labels ({labels.name}) are {_dims(labels.shape)} at offset {list(offset)} but the images "
                f"({images.name}) are {_dims(images.shape)} (z x y x x): the crop must fit inside the images; "
                "fix volumes.<name>.labels_offset (--labels-offset) or crop the labels"
            )
        return
    depth, height, width = images.shape
    if labels.shape[0] != depth:
        raise EmmitoError(
            f"{labels.shape[0]} label slices ({labels.name}) but {depth} image slices "
            f"({images.name}): give one label slice per image slice"
        )
    if labels.shape[1:] != (height, width):
        raise EmmitoError(
            f"label slices ({labels.name}) are {labels.shape[2]}x{labels.shape[1]} but image slices "
            f"({images.name}) are {width}x{height}: labels must match the images pixel for pixel"
        )


def convert_stack(
    image_paths: Spec,
    *,
    voxel_size: Sequence[float],
    image_out: Path | None = None,
    label_paths: Spec | None = None,
    label_format: str = "binary",
    label_out: Path | None = None,
    settings: dict[str, Any] | None = None,
    labels_offset: Sequence[int] | None = None,
    valid_paths: Spec | None = None,
) -> dict[str, Any]:
    """Write ``image_out`` (uint8) and/or ``label_out`` (uint32 ids) from image and label specs.

    ``image_paths`` / ``label_paths``: an emmito.sources spec (a folder or glob of
    slices, a TIFF stack, ``file.h5:/dataset``, ``store.zarr:/array``, ``x.n5:/dataset``),
    a list of slice files in z order, or an open Source. ``settings``: the config's
    ``convert`` section (defaults where None). Checks sizes and counts from
    headers and metadata first; both files appear only if both are written in
    full. Returns a summary (depth, height, width, objects, intensity_mapping;
    valid_box and valid_voxels where partly labelled).

    ``labels_offset`` (z, y, x): the labels are a crop of the images with its first
    voxel there (label.h5 keeps the images' shape, 0 outside the crop);
    ``valid_paths``: a spec of the labels' shape, non-zero where they are known.
    Either makes the volume partly labelled: label.h5 then holds the valid mask
    (see the module docstring).
    """
    if label_format not in LABEL_FORMATS:
        raise EmmitoError(f"label format {label_format!r} is unknown: use one of {', '.join(LABEL_FORMATS)}")
    if (label_out is None) != (label_paths is None):
        raise EmmitoError("convert: --labels and --label-out go together: give both or neither")
    if image_out is None and label_out is None:
        raise EmmitoError("convert: nothing to write: give --image-out and/or --labels with --label-out")
    partial = labels_offset is not None or valid_paths is not None
    if partial and label_paths is None:
        raise EmmitoError(
            "convert: --labels-offset and --valid describe the labels: give them with --labels and --label-out"
        )
    if labels_offset is not None:
        offset = [int(v) for v in labels_offset]
        if len(offset) != 3 or any(v < 0 for v in offset) or any(v != float(o) for v, o in zip(offset, labels_offset)):
            raise EmmitoError(
                f"labels offset {list(labels_offset)}: give 3 whole numbers >= 0, (z, y, x) of the labels' first voxel in the images"
            )
        labels_offset = offset
    settings = settings if settings is not None else section_defaults("convert")
    with contextlib.ExitStack() as opened:
        images = opened.enter_context(_open(image_paths, "image"))
        images.check(progress=True)
        labels = None
        if label_paths is not None:
            labels = opened.enter_context(_open(label_paths, label_format))
            labels.check(progress=True)
        valid = None
        if valid_paths is not None:
            # any integer values, non-zero = labelled (the instance reading: 0/1, 0/255 or ids alike)
            valid = opened.enter_context(_open(valid_paths, "instance"))
            valid.check(progress=True)
        _check_together(images, labels, labels_offset, valid)
        mapping = choose_mapping(images, settings) if image_out is not None else None
        crop = (labels_offset or [0, 0, 0]) if partial else None
        return _write(
            images, labels, label_format, mapping, [float(v) for v in voxel_size], image_out, label_out, crop, valid
        )


def _write(
    images: Source,
    labels: Source | None,
    label_format: str,
    mapping: IntensityMapping | None,
    voxel_size: list[float],
    image_out: Path | None,
    label_out: Path | None,
    crop: list[int] | None = None,
    valid: Source | None = None,
) -> dict[str, Any]:
    """Stream both outputs; ``crop``: the labels' offset in the images where partly labelled (None: labelled everywhere)."""
    depth, height, width = images.shape
    summary: dict[str, Any] = {"depth": depth, "height": height, "width": width}
    image_attrs = {contract.INTENSITY_MAPPING: mapping.to_json()} if mapping is not None else None
    if mapping is not None:
        summary["intensity_mapping"] = mapping
    with _maybe_volume(image_out, images.shape, np.uint8, voxel_size, image_attrs) as image_ds:
        if image_ds is not None and mapping is not None:
            _stream(image_ds, images, "image", mapping.apply)
        with _maybe_volume(label_out, images.shape, np.uint32, voxel_size) as label_ds:
            if label_ds is not None and labels is not None:
                if crop is not None:
                    summary.update(_write_valid(label_ds, labels, valid, crop))
                _stream(label_ds, labels, "label", offset=crop)
                if label_format == "binary":
                    chunk_depth = label_ds.chunks[0] if label_ds.chunks else 1
                    summary["objects"] = label_components(
                        label_ds, _slab_slices(height, width, chunk_depth), LABEL_CONNECTIVITY, progress=True
                    )
    return summary


def _write_valid(label_ds: h5py.Dataset, labels: Source, valid: Source | None, crop: list[int]) -> dict[str, Any]:
    """The VALID_MASK dataset beside ``label_ds`` (same shape, chunks, compression) and its VALID_BOX attribute."""
    mask_ds = label_ds.file.create_dataset(
        contract.VALID_MASK,
        shape=label_ds.shape,
        dtype=np.uint8,
        chunks=label_ds.chunks,
        track_times=False,
        fillvalue=0,
        **compression(),
    )
    box, count = _stream_valid(mask_ds, valid, labels.shape, crop)
    if not count:
        where = f"the valid mask ({valid.name}) is 0 everywhere" if valid is not None else "the labels' crop is empty"
        raise EmmitoError(f"{where}: no voxel of the labels ({labels.name}) is marked labelled; mark the labelled voxels non-zero")
    label_ds.attrs[contract.VALID_BOX] = np.asarray(box, dtype=np.int64)
    return {"valid_box": box, "valid_voxels": count}


def _valid_text(summary: dict[str, Any]) -> str:
    if "valid_box" not in summary:
        return ""
    z0, y0, x0, z1, y1, x1 = summary["valid_box"]
    return f", valid in {z0}:{z1}, {y0}:{y1}, {x0}:{x1} ({summary['valid_voxels']} voxels)"


def _maybe_volume(
    path: Path | None, shape: tuple[int, int, int], dtype: Any, voxel_size: list[float], attrs: dict[str, Any] | None = None
):
    """``create_volume`` when ``path`` is set, else a context that yields None."""
    if path is None:
        return contextlib.nullcontext()
    return create_volume(path, shape, dtype, voxel_size=voxel_size, offset=0, attrs=attrs)


def _mapping_text(mapping: IntensityMapping | None) -> str:
    if mapping is None:
        return ""
    if mapping.low is None:
        return f", intensity {mapping.rule} ({mapping.source_dtype})"
    return f", intensity {mapping.rule} ({mapping.source_dtype} [{mapping.low:g}, {mapping.high:g}] -> 0..255)"


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito convert --images SPEC [--labels SPEC --label-format F [--labels-offset Z Y X] [--valid SPEC]] --voxel-size Z Y X --image-out ... [--label-out ...] [--params JSON]``."""
    image_out = getattr(args, "image_out", None)
    label_out = getattr(args, "label_out", None)
    summary = convert_stack(
        args.images,
        voxel_size=args.voxel_size,
        image_out=Path(image_out) if image_out else None,
        label_paths=args.labels or None,
        label_format=args.label_format,
        label_out=Path(label_out) if label_out else None,
        settings=params.get("convert"),
        labels_offset=getattr(args, "labels_offset", None),
        valid_paths=getattr(args, "valid", None) or None,
    )
    objects = f", {summary['objects']} objects" if "objects" in summary else ""
    print(
        f"convert: {summary['depth']} slices of {summary['width']}x{summary['height']}{objects}"
        f"{_mapping_text(summary.get('intensity_mapping'))}{_valid_text(summary)}"
        f" -> {', '.join(str(p) for p in (image_out, label_out) if p)}",
        file=sys.stderr,
    )
