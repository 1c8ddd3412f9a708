"""seg.h5 -> objects.csv (one row per object) and meshes/ (neuroglancer legacy meshes), one object at a time.

Two passes over seg.h5's full-resolution dataset:
1. slab by slab (``SLAB_SLICES`` slices): each object's voxel count and
   bounding box (``labels.ObjectStatistics``);
2. object by object, ids ascending: read its bounding box only, take its mask,
   and measure it (``meshing.measure_object``: centroid, surface area, skeleton
   length, largest cross-section) and mesh it (``meshing.viewer_mesh``).
Memory is bounded by a slab (pass 1) and by the largest object's box (pass 2),
never by the volume.

objects.csv has the columns ``contract.OBJECT_COLUMNS`` (``labels.write_objects``:
fixed decimals, so the same seg.h5 gives the same bytes). ``first_block`` /
``last_block`` are the segment blocks of ``block_slices`` slices (merge.block_slices)
its first and last slice fall in; ``touches_edge`` is 1 where its box reaches a
face of the volume. The meshes folder holds ``info`` (``contract.MESH_INFO``),
per object the manifest ``contract.mesh_manifest_name(id)`` and the fragment
``<id>`` (zmesh ``Mesh.to_precomputed``); it is written in a temporary folder
beside it and moved into place when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import h5py
from tqdm import tqdm

from emmito import contract
from emmito.io import EmmitoError, atomic_directory, open_volume, volume_attrs
from emmito.labels import ObjectStatistics, write_objects
from emmito.meshing import Geometry, measure_object, viewer_mesh

# Slices per read in the counting pass (a 4k x 4k uint32 slice is 64 MB).
SLAB_SLICES = 8
# HDF5 chunk cache of the per-object reads: neighbouring objects (ids run roughly in z
# order) share chunks, which are then decompressed once.
CHUNK_CACHE_BYTES = 256 * 2**20


def _check_seg(path: Path, ds: h5py.Dataset) -> None:
    if ds.ndim != 3 or ds.dtype.kind not in "ui":
        raise EmmitoError(
            f"{path}: labels are {ds.dtype} of shape {tuple(ds.shape)}, not integer (z, y, x): "
            "measure the seg.h5 that emmito upsample writes"
        )


def count_objects(ds: h5py.Dataset, progress: bool = False) -> ObjectStatistics:
    """Pass 1: voxel count and bounding box of every label of ``ds`` (z, y, x), SLAB_SLICES slices at a time."""
    statistics = ObjectStatistics()
    starts = range(0, ds.shape[0], SLAB_SLICES)
    for start in tqdm(starts, desc="measure: count", unit="slab", file=sys.stderr, disable=not progress):
        statistics.add(ds[start : start + SLAB_SLICES], (start, 0, 0))
    return statistics


def object_row(
    label: int,
    geometry: Geometry,
    box: tuple[list[int], list[int]],
    voxel_size: list[float],
    z_offset: int,
    shape: tuple[int, ...],
    block_slices: int,
) -> dict[str, Any]:
    """One row of objects.csv (contract.OBJECT_COLUMNS) from an object's geometry and half-open box (low, high)."""
    low, high = box
    vz, vy, vx = voxel_size
    first, last = z_offset + low[0], z_offset + high[0] - 1
    frame_low = [first, low[1], low[2]]
    frame_high = [last + 1, high[1], high[2]]
    row: dict[str, Any] = {
        "id": int(label),
        "voxels": geometry.voxels,
        "volume_um3": geometry.voxels * vz * vy * vx / 1e9,
        "surface_um2": geometry.surface_nm2 / 1e6,
        "length_um": geometry.length_nm / 1e3,
        "max_cross_section_um2": geometry.max_cross_section_voxels * vy * vx / 1e6,
        "first_slice": first,
        "last_slice": last,
        "first_block": first // block_slices,
        "last_block": last // block_slices,
        "touches_edge": int(any(lo == 0 for lo in low) or any(hi == size for hi, size in zip(high, shape))),
    }
    for axis, name in enumerate("zyx"):
        row[f"centroid_{name}_nm"] = geometry.centroid_nm[axis]
        row[f"bbox_{name}0_nm"] = frame_low[axis] * voxel_size[axis]
        row[f"bbox_{name}1_nm"] = frame_high[axis] * voxel_size[axis]
    return row


def _write_mesh(folder: Path, label: int, mesh: Any) -> None:
    """One object's fragment and manifest (plain writes: the folder as a whole is moved into place)."""
    (folder / str(label)).write_bytes(mesh.to_precomputed())
    (folder / contract.mesh_manifest_name(label)).write_text(json.dumps({"fragments": [str(label)]}, sort_keys=True) + "\n")


def measure_objects(
    seg_path: Path, params: dict[str, Any], block_slices: int, mesh_folder: Path | None, progress: bool = False
) -> list[dict[str, Any]]:
    """Both passes over ``seg_path``: the rows of objects.csv; meshes written into ``mesh_folder`` where given."""
    with open_volume(seg_path) as ds:
        _check_seg(seg_path, ds)
        attrs = volume_attrs(ds)
        voxel_size, z_offset, shape = contract.voxel_size(attrs), contract.offset(attrs), tuple(int(s) for s in ds.shape)
        statistics = count_objects(ds, progress)
    rows = []
    with h5py.File(seg_path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007) as f:
        ds = f[contract.DATASET]
        labels = sorted(statistics.voxels)
        for label in tqdm(labels, desc="measure: objects", unit="object", file=sys.stderr, disable=not progress):
            low, high = statistics.low[label], statistics.high[label]
            mask = ds[low[0] : high[0], low[1] : high[1], low[2] : high[2]] == label
            # The mask's origin in the volume frame: z counts from the file's offset.
            origin = (z_offset + low[0], low[1], low[2])
            geometry = measure_object(mask, voxel_size, origin, params)
            rows.append(object_row(label, geometry, (low, high), voxel_size, z_offset, shape, block_slices))
            if mesh_folder is not None:
                mesh = viewer_mesh(mask, voxel_size, origin, params["mesh_reduction"], params["mesh_max_error"])
                _write_mesh(mesh_folder, label, mesh)
            del mask
    return rows


def measure_files(
    seg_path: Path, objects_csv: Path, mesh_dir: Path | None, params: dict[str, Any], block_slices: int, progress: bool = False
) -> list[dict[str, Any]]:
    """Write objects.csv (and the meshes folder, where ``mesh_dir`` is given); returns the rows.

    ``params``: the ``measure`` config section; ``block_slices``: merge.block_slices.
    """
    if block_slices < 1:
        raise EmmitoError(f"--block-slices {block_slices}: give the segment blocks' slices (merge.block_slices), at least 1")
    with open_volume(seg_path) as ds:  # a bad seg.h5 fails here, before any output is begun
        _check_seg(seg_path, ds)
    if mesh_dir is None:
        rows = measure_objects(seg_path, params, block_slices, None, progress)
        write_objects(objects_csv, rows)
        return rows
    with atomic_directory(Path(mesh_dir)) as folder:
        (folder / "info").write_text(json.dumps(contract.MESH_INFO, sort_keys=True) + "\n")
        rows = measure_objects(seg_path, params, block_slices, folder, progress)
        write_objects(objects_csv, rows)
    return rows


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito measure SEG OBJECTS_CSV [--meshes DIR] [--block-slices N] --params JSON``."""
    block_slices = args.block_slices if args.block_slices is not None else params["merge"]["block_slices"]
    rows = measure_files(args.seg, args.objects, args.meshes, params["measure"], block_slices, progress=True)
    where = f" and meshes in {args.meshes}" if args.meshes else ""
    print(f"emmito measure: {len(rows)} objects -> {args.objects}{where}", file=sys.stderr)
