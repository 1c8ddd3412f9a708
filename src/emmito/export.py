"""seg.h5 + image.h5 -> neuroglancer precomputed volumes, multiscale, written with tensorstore.

``OUT_DIR/image`` holds the EM image (uint8, each scale the mean of 2 x 2 voxels
of the one before) and ``OUT_DIR/segmentation`` the labels (uint32,
compressed_segmentation encoding, each scale the mode of 2 x 2 voxels). Like
seg.h5's pyramid, scales halve y and x only: EM voxels are already several
times longer in z. The segmentation copies the scales seg.h5 stores (its pyramid
levels, ``contract.level_name``) and computes any further ones from the scale
before, read back from the output.

Volumes larger than ``shard_above_voxels`` are sharded (a few thousand files
instead of millions of chunk files). The volume is written one region at a
time, a region being one shard (or, unsharded, a few chunks), so memory is
bounded by the region, never the volume. Everything is written into a
temporary folder beside ``OUT_DIR`` and moved into place when complete.

The segmentation also gets neuroglancer segment properties and
``OUT_DIR/objects.json`` (per object its bounding box in voxels, z, y, x at full
resolution, and its voxels, volume, surface and length), both from the measure
stage's objects.csv: ``emmito view`` uses objects.json to pick and centre on
the largest objects. The meshes measure wrote are copied in as the
segmentation's ``mesh/`` (neuroglancer's legacy mesh format), so the viewer's 3D
panel shows every object.

The same verb writes the formats of ``emmito.outputs`` (``--ome-zarr``, ``--tiff``).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from emmito import contract
from emmito.io import EmmitoError, atomic_directory, open_volume, read_json, volume_attrs, write_json
from emmito.outputs import NGFF_VERSION, check_pair, write_ome_zarr, write_tiff
from emmito.resampling import downsample_mode, mean_downsample

IMAGE_LAYER = "image"
SEGMENTATION_LAYER = "segmentation"
OBJECTS_FILE = "objects.json"
SEGMENT_PROPERTIES = "segment_properties"
MESH_DIR = "mesh"  # the segmentation's meshes (its info's "mesh")
# Chunks that neighbour in the chunk grid share a minishard, so one minishard
# index read serves a neighbourhood of chunks.
MINISHARD_CHUNKS = 8


def sharding_spec(grid_chunks: tuple[int, int, int], shard_chunks: int) -> dict[str, Any]:
    """Neuroglancer uint64 sharding for a chunk grid (x, y, z counts) with about ``shard_chunks`` chunks per shard.

    Chunk keys are compressed Morton codes, so with the identity hash the low
    bits pick a brick of neighbouring chunks: ``preshift_bits`` chunks per
    minishard, ``minishard_bits`` minishards per shard, and ``shard_bits``
    whatever is left to tell the shards apart.
    """
    morton_bits = sum(max(0, math.ceil(math.log2(n))) for n in grid_chunks)
    brick_bits = min(morton_bits, max(0, int(math.log2(shard_chunks))))
    preshift_bits = min(brick_bits, int(math.log2(MINISHARD_CHUNKS)))
    return {
        "@type": "neuroglancer_uint64_sharded_v1",
        "hash": "identity",
        "preshift_bits": preshift_bits,
        "minishard_bits": brick_bits - preshift_bits,
        "shard_bits": morton_bits - brick_bits,
        "minishard_index_encoding": "gzip",
        "data_encoding": "gzip",
    }


def scale_shapes(shape: tuple[int, int, int], chunk_size: tuple[int, int, int], pyramid_levels: int) -> list[tuple[int, int, int]]:
    """(z, y, x) shapes of scale 0..N: each halves y and x (ceil).

    Stops after ``pyramid_levels`` extra scales, or earlier once a slice fits
    in one chunk (coarser scales would only repeat it).
    """
    shapes = [tuple(shape)]
    while len(shapes) <= pyramid_levels:
        z, y, x = shapes[-1]
        if y <= chunk_size[1] and x <= chunk_size[2]:
            break
        shapes.append((z, -(-y // 2), -(-x // 2)))
    return shapes


# objects.csv columns shown as neuroglancer number properties: (column, data type, description).
NUMBER_PROPERTIES = (
    ("voxels", "uint32", "voxels at full resolution"),
    ("volume_um3", "float32", "volume in cubic micrometres"),
    ("surface_um2", "float32", "surface area of the mesh in square micrometres"),
    ("length_um", "float32", "skeleton length in micrometres"),
    ("max_cross_section_um2", "float32", "largest area in one slice in square micrometres"),
    ("touches_edge", "uint8", "1: touches the volume's edge, so it is cut and its size a lower bound"),
)
# objects.json keeps, per object, its voxel box and these objects.csv figures.
RECORD_COLUMNS = ("voxels", "volume_um3", "surface_um2", "length_um", "touches_edge")
_UINT_MAX = {"uint8": 2**8 - 1, "uint32": 2**32 - 1}


def _object_label(row: dict[str, Any]) -> str:
    """The line neuroglancer shows beside an id: volume, length, and whether it is cut."""
    cut = " (cut by the volume's edge)" if int(row["touches_edge"]) else ""
    return f"{float(row['volume_um3']):.3g} µm³, {float(row['length_um']):.3g} µm long{cut}"


def segment_properties(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """Neuroglancer segment properties from objects.csv's rows (``labels.read_objects``), ids ascending."""
    rows = sorted(objects, key=lambda row: int(row["id"]))
    properties: list[dict[str, Any]] = [{"id": "label", "type": "label", "values": [_object_label(row) for row in rows]}]
    for column, data_type, description in NUMBER_PROPERTIES:
        if data_type in _UINT_MAX:
            values: list[Any] = [min(int(row[column]), _UINT_MAX[data_type]) for row in rows]
        else:
            values = [float(row[column]) for row in rows]
        properties.append({"id": column, "type": "number", "data_type": data_type, "description": description, "values": values})
    return {
        "@type": "neuroglancer_segment_properties",
        "inline": {"ids": [str(int(row["id"])) for row in rows], "properties": properties},
    }


def voxel_box(row: dict[str, Any], voxel_size: list[float]) -> list[int]:
    """[z0, y0, x0, z1, y1, x1] (half-open, voxels) of an objects.csv row, whose boxes are in nm (low corners)."""
    low = [round(float(row[f"bbox_{axis}0_nm"]) / size) for axis, size in zip("zyx", voxel_size)]
    high = [round(float(row[f"bbox_{axis}1_nm"]) / size) for axis, size in zip("zyx", voxel_size)]
    return low + high


def objects_record(objects: list[dict[str, Any]], voxel_size: list[float]) -> dict[str, dict[str, Any]]:
    """objects.json's "objects": {id: {"bbox": voxel box, and RECORD_COLUMNS}} with ids as strings, ascending."""
    record = {}
    for row in sorted(objects, key=lambda row: int(row["id"])):
        entry: dict[str, Any] = {"bbox": voxel_box(row, voxel_size)}
        for column in RECORD_COLUMNS:
            entry[column] = int(row[column]) if column in ("voxels", "touches_edge") else float(row[column])
        record[str(int(row["id"]))] = entry
    return record


def read_measurements(objects_path: Path, shape: tuple[int, int, int], voxel_size: list[float]) -> list[dict[str, Any]]:
    """objects.csv's rows, after checking that every box lies inside the volume (else it is of another volume)."""
    from emmito.labels import read_objects

    objects = read_objects(objects_path)
    for row in objects:
        box = voxel_box(row, voxel_size)
        if int(row["id"]) <= 0 or min(box) < 0 or any(high > size for high, size in zip(box[3:], shape)):
            raise EmmitoError(
                f"{objects_path}: object {row['id']} has box {box} (voxels), outside the volume {list(shape)}: "
                "it is of another volume or stale; rerun emmito measure on this seg.h5"
            )
    return objects


def copy_meshes(meshes_dir: Path, layer_dir: Path, ids: list[int]) -> None:
    """Copy the measure stage's meshes (neuroglancer legacy format) into ``layer_dir``/mesh, after checking them."""
    info = meshes_dir / "info"
    try:
        kind = read_json(info).get("@type") if info.exists() else None
    except EmmitoError:
        kind = None
    if kind != contract.MESH_INFO["@type"]:
        raise EmmitoError(f"{meshes_dir}: not a meshes folder (no info of type {contract.MESH_INFO['@type']}): rerun emmito measure, or fix --meshes")
    present = set(os.listdir(meshes_dir))
    missing = [i for i in ids if contract.mesh_manifest_name(i) not in present]
    if missing:
        raise EmmitoError(
            f"{meshes_dir}: no mesh for {len(missing)} of the {len(ids)} objects of objects.csv (first: {missing[0]}): "
            "meshes and objects.csv are from different measure runs; rerun emmito measure"
        )
    shutil.copytree(meshes_dir, layer_dir / MESH_DIR)


def _open_scales(
    path: Path,
    layer_type: str,
    dtype: str,
    shapes: list[tuple[int, int, int]],
    voxel_size: list[float],
    params: dict[str, Any],
) -> list[Any]:
    """Create one precomputed volume with a scale per shape; returns a tensorstore per scale (x, y, z, channel)."""
    import tensorstore as ts

    chunk_z, chunk_y, chunk_x = params["chunk_size"]
    sharded = int(np.prod(shapes[0], dtype=np.int64)) > params["shard_above_voxels"]
    stores = []
    for level, (z, y, x) in enumerate(shapes):
        scale = 2**level
        metadata: dict[str, Any] = {
            "size": [x, y, z],
            "resolution": [voxel_size[2] * scale, voxel_size[1] * scale, voxel_size[0]],
            "chunk_size": [min(chunk_x, x), min(chunk_y, y), min(chunk_z, z)],
            "voxel_offset": [0, 0, 0],
        }
        if layer_type == "segmentation":
            metadata["encoding"] = "compressed_segmentation"
            metadata["compressed_segmentation_block_size"] = [8, 8, 8]
        else:
            metadata["encoding"] = params["image_encoding"]
        if sharded:
            grid = tuple(-(-size // chunk) for size, chunk in zip(metadata["size"], metadata["chunk_size"]))
            metadata["sharding"] = sharding_spec(grid, params["shard_chunks"])
        spec = {
            "driver": "neuroglancer_precomputed",
            "kvstore": {"driver": "file", "path": str(path)},
            "multiscale_metadata": {"type": layer_type, "data_type": dtype, "num_channels": 1},
            "scale_metadata": metadata,
        }
        stores.append(ts.open(spec, create=True).result())
    return stores


def _regions(store: Any, shape: tuple[int, int, int], shard_chunks: int) -> list[tuple[slice, slice, slice]]:
    """(z, y, x) slices that tile ``shape``, each a whole shard (sharded) or a brick of whole chunks.

    Writing whole shards avoids reading back and rewriting a shard for every
    part of it; the region is also the unit of memory.
    """
    write_x, write_y, write_z = store.chunk_layout.write_chunk.shape[:3]
    read_x, read_y = store.chunk_layout.read_chunk.shape[:2]
    if (write_x, write_y) == (read_x, read_y):  # unsharded: group chunks into a brick
        side = max(1, math.isqrt(shard_chunks))
        write_y, write_x = write_y * side, write_x * side
    step = (write_z, write_y, write_x)
    starts = [range(0, size, s) for size, s in zip(shape, step)]
    return [
        tuple(slice(start, min(start + s, size)) for start, s, size in zip(origin, step, shape))
        for origin in ((z, y, x) for z in starts[0] for y in starts[1] for x in starts[2])
    ]


def _read_store(store: Any, region: tuple[slice, slice, slice]) -> np.ndarray:
    """A (z, y, x) region of a precomputed scale as a C-ordered numpy array."""
    z, y, x = region
    data = store[x.start : x.stop, y.start : y.stop, z.start : z.stop, 0].read().result()
    return np.ascontiguousarray(data.transpose(2, 1, 0))


def _write_store(store: Any, region: tuple[slice, slice, slice], data: np.ndarray) -> None:
    z, y, x = region
    store[x.start : x.stop, y.start : y.stop, z.start : z.stop, 0].write(data.transpose(2, 1, 0)).result()


def _finer_region(region: tuple[slice, slice, slice], finer_shape: tuple[int, int, int]) -> tuple[slice, slice, slice]:
    """The region of the next finer scale that a region of this scale is computed from."""
    z, y, x = region
    return (z, slice(2 * y.start, min(2 * y.stop, finer_shape[1])), slice(2 * x.start, min(2 * x.stop, finer_shape[2])))


def _downsampled_region(
    finer_store: Any,
    finer_shape: tuple[int, int, int],
    region: tuple[slice, slice, slice],
    downsample: Callable[[np.ndarray], np.ndarray],
    z_step: int,
) -> np.ndarray:
    """A region of a scale computed from the finer scale, ``z_step`` slices at a time.

    The finer region is 4x larger; reading it a few slices at a time keeps
    that from setting the peak memory.
    """
    z, y, x = region
    out: np.ndarray | None = None
    for z_start in range(z.start, z.stop, z_step):
        part = (slice(z_start, min(z_start + z_step, z.stop)), y, x)
        small = downsample(_read_store(finer_store, _finer_region(part, finer_shape)))
        if out is None:
            out = np.empty((z.stop - z.start, *small.shape[1:]), dtype=small.dtype)
        out[z_start - z.start : z_start - z.start + small.shape[0]] = small
    assert out is not None
    return out


def _write_layer(
    stores: list[Any],
    shapes: list[tuple[int, int, int]],
    read_source: Callable[[int, tuple[slice, slice, slice]], np.ndarray | None],
    downsample: Callable[[np.ndarray], np.ndarray],
    shard_chunks: int,
    name: str,
    progress: bool,
) -> None:
    """Fill every scale region by region.

    ``read_source(level, region)`` gives a scale's data from the input files, or
    None when the inputs do not hold that scale: it is then computed with
    ``downsample`` from the scale before, read back from the output.
    """
    z_step = stores[0].chunk_layout.read_chunk.shape[2]
    for level, (store, shape) in enumerate(zip(stores, shapes)):
        regions = _regions(store, shape, shard_chunks)
        for region in tqdm(regions, desc=f"export {name} s{level}", unit="region", file=sys.stderr, disable=not progress):
            data = read_source(level, region)
            if data is None:
                data = _downsampled_region(stores[level - 1], shapes[level - 1], region, downsample, z_step)
            _write_store(store, region, data)


def _check_tensorstore() -> None:
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        raise EmmitoError(
            "emmito export needs tensorstore: pip install 'emmito[view]' (or pip install tensorstore)"
        ) from None


def _write_layers(tmp: Path, seg: Any, image: Any, shapes: list[tuple[int, int, int]], voxel_size: list[float], params: dict[str, Any], progress: bool) -> None:
    """The image and segmentation layers (every scale) into ``tmp``."""
    seg_file = seg.file

    def seg_source(level: int, region: tuple[slice, slice, slice]) -> np.ndarray | None:
        name = contract.level_name(level)
        if name not in seg_file or tuple(seg_file[name].shape) != shapes[level]:
            return None
        return seg_file[name][region].astype(np.uint32, copy=False)

    def image_source(level: int, region: tuple[slice, slice, slice]) -> np.ndarray | None:
        return image[region] if level == 0 else None

    image_stores = _open_scales(tmp / IMAGE_LAYER, "image", "uint8", shapes, voxel_size, params)
    _write_layer(image_stores, shapes, image_source, mean_downsample, params["shard_chunks"], IMAGE_LAYER, progress)
    del image_stores
    seg_stores = _open_scales(tmp / SEGMENTATION_LAYER, "segmentation", "uint32", shapes, voxel_size, params)
    _write_layer(seg_stores, shapes, seg_source, downsample_mode, params["shard_chunks"], SEGMENTATION_LAYER, progress)


def export_files(
    seg_path: Path,
    image_path: Path,
    out_dir: Path,
    params: dict[str, Any],
    objects_path: Path,
    meshes_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``out_dir``/image and ``out_dir``/segmentation (precomputed) and ``out_dir``/objects.json.

    ``seg_path``: seg.h5 (uint32 (z, y, x), optional pyramid s1..sN);
    ``image_path``: image.h5 (uint8, same shape); ``objects_path``: its
    objects.csv (emmito measure), the figures of the segment properties and
    objects.json; ``meshes_dir``: the meshes measure wrote, copied into the
    segmentation as ``mesh/``. ``params``: the ``export`` config section.
    Returns the objects.json record.
    """
    _check_tensorstore()
    with open_volume(image_path) as image, open_volume(seg_path) as seg:
        check_pair(seg_path, seg, image_path, image)
        voxel_size = contract.voxel_size(volume_attrs(seg))
        shape = tuple(int(s) for s in image.shape)
        objects = read_measurements(objects_path, shape, voxel_size)
        shapes = scale_shapes(shape, tuple(params["chunk_size"]), params["pyramid_levels"])
        with atomic_directory(out_dir) as tmp:
            _write_layers(tmp, seg, image, shapes, voxel_size, params, progress)
            layer = tmp / SEGMENTATION_LAYER
            info = read_json(layer / "info")
            info["segment_properties"] = SEGMENT_PROPERTIES
            if meshes_dir is not None:
                copy_meshes(Path(meshes_dir), layer, [int(row["id"]) for row in objects])
                info["mesh"] = MESH_DIR
            write_json(layer / "info", info)
            write_json(layer / SEGMENT_PROPERTIES / "info", segment_properties(objects))
            record = {
                "shape": list(shape),
                contract.VOXEL_SIZE: voxel_size,
                "scales": [list(s) for s in shapes],
                "layers": {"image": IMAGE_LAYER, "segmentation": SEGMENTATION_LAYER},
                "meshes": meshes_dir is not None,
                "objects": objects_record(objects, voxel_size),
            }
            write_json(tmp / OBJECTS_FILE, record)
    return record


# emmito export's formats: the paths each takes.
FORMAT_PATHS = {"precomputed": ("SEG", "IMAGE", "OUT_DIR"), "ome-zarr": ("SEG", "IMAGE", "OUT.ome.zarr"), "tiff": ("SEG", "OUT.tif")}
FORMAT_FLAGS = {"precomputed": "", "ome-zarr": " --ome-zarr", "tiff": " --tiff"}


def export_paths(args: argparse.Namespace) -> list[Path]:
    """The positional paths of ``emmito export``, checked against the format (one-line errors)."""
    names = FORMAT_PATHS[args.format]
    usage = f"emmito export{FORMAT_FLAGS[args.format]} {' '.join(names)}"
    if len(args.paths) != len(names):
        raise EmmitoError(f"{usage} takes {len(names)} paths, got {len(args.paths)}: {' '.join(map(str, args.paths))}")
    if args.format == "precomputed" and args.objects is None:
        raise EmmitoError(f"{usage} needs --objects objects.csv (from emmito measure, which also writes the --meshes folder)")
    if args.format != "precomputed" and (args.objects or args.meshes):
        raise EmmitoError(f"{usage}: --objects and --meshes belong to the neuroglancer export (without{FORMAT_FLAGS[args.format]})")
    return [Path(p) for p in args.paths]


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito export SEG IMAGE OUT_DIR --objects CSV [--meshes DIR]``, ``--ome-zarr SEG IMAGE OUT``, ``--tiff SEG OUT``."""
    paths = export_paths(args)
    if args.format == "ome-zarr":
        done = write_ome_zarr(*paths, progress=True)
        print(f"emmito export: image and labels, {done['levels']} levels -> {paths[-1]} (OME-NGFF {NGFF_VERSION})", file=sys.stderr)
    elif args.format == "tiff":
        done = write_tiff(*paths, progress=True)
        print(f"emmito export: {done['dtype']} labels {done['shape']} (largest id {done['max_id']}) -> {paths[-1]}", file=sys.stderr)
    else:
        record = export_files(*paths, params["export"], args.objects, args.meshes, progress=True)
        meshes = " with meshes" if record["meshes"] else ""
        print(
            f"emmito export: {len(record['objects'])} objects{meshes}, {len(record['scales'])} scales -> {paths[-1]} "
            f"(view it with: emmito view {paths[-1]})",
            file=sys.stderr,
        )
