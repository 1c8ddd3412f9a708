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

The segmentation also gets neuroglancer segment properties (voxel count and
volume per object) and ``OUT_DIR/objects.json``: per object its voxel count and
bounding box (z, y, x at full resolution), which ``emmito view`` uses to pick
and centre on the largest objects.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cc3d
import fastremap
import numpy as np
from tqdm import tqdm

from emmito import contract
from emmito.io import EmmitoError, open_volume, volume_attrs, write_json
from emmito.resampling import downsample_mode, mean_downsample

IMAGE_LAYER = "image"
SEGMENTATION_LAYER = "segmentation"
OBJECTS_FILE = "objects.json"
SEGMENT_PROPERTIES = "segment_properties"
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


def segment_properties(voxels: dict[int, int], voxel_size: list[float]) -> dict[str, Any]:
    """Neuroglancer segment properties: per id its voxel count and volume in µm³ (ids ascending)."""
    ids = sorted(voxels)
    voxel_um3 = float(np.prod(voxel_size)) / 1e9
    return {
        "@type": "neuroglancer_segment_properties",
        "inline": {
            "ids": [str(i) for i in ids],
            "properties": [
                {"id": "label", "type": "label", "values": [f"{voxels[i]} voxels" for i in ids]},
                {
                    "id": "voxels",
                    "type": "number",
                    "data_type": "uint32",
                    "description": "voxels at full resolution",
                    "values": [min(voxels[i], 2**32 - 1) for i in ids],
                },
                {
                    "id": "volume_um3",
                    "type": "number",
                    "data_type": "float32",
                    "description": "volume in cubic micrometres",
                    "values": [round(voxels[i] * voxel_um3, 6) for i in ids],
                },
            ],
        },
    }


class ObjectStatistics:
    """Voxel count and bounding box (z, y, x at scale 0) per label, accumulated region by region."""

    def __init__(self) -> None:
        self.voxels: dict[int, int] = {}
        self.low: dict[int, list[int]] = {}
        self.high: dict[int, list[int]] = {}

    def add(self, labels: np.ndarray, origin: tuple[int, int, int]) -> None:
        """Count uint (z, y, x) ``labels`` whose first voxel sits at ``origin`` (z, y, x) in the volume."""
        if not labels.any():
            return
        # statistics() sizes its tables by the largest label, so number the region's labels 1..n first.
        local, remap = fastremap.renumber(np.ascontiguousarray(labels), preserve_zero=True)
        stats = cc3d.statistics(local, no_slice_conversion=True)
        boxes = stats["bounding_boxes"].astype(np.int64)
        for global_id, local_id in remap.items():
            if global_id == 0:
                continue
            count = int(stats["voxel_counts"][local_id])
            if count == 0:
                continue
            box = boxes[local_id]
            low = [origin[a] + int(box[2 * a]) for a in range(3)]
            high = [origin[a] + int(box[2 * a + 1]) + 1 for a in range(3)]
            global_id = int(global_id)
            if global_id in self.voxels:
                self.voxels[global_id] += count
                self.low[global_id] = [min(a, b) for a, b in zip(self.low[global_id], low)]
                self.high[global_id] = [max(a, b) for a, b in zip(self.high[global_id], high)]
            else:
                self.voxels[global_id], self.low[global_id], self.high[global_id] = count, low, high

    def record(self) -> dict[str, dict[str, Any]]:
        """{id: {"voxels", "bbox": [z0, y0, x0, z1, y1, x1] (half-open)}} with ids as strings, ascending."""
        return {
            str(i): {"voxels": self.voxels[i], "bbox": self.low[i] + self.high[i]} for i in sorted(self.voxels)
        }


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
    statistics: ObjectStatistics | None = None,
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
            if statistics is not None and level == 0:
                statistics.add(data, (region[0].start, region[1].start, region[2].start))


@contextlib.contextmanager
def _atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; swap it into place only on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    # Folders left by killed exports of this output (Snakemake's lock means no other
    # writer is alive) would otherwise pile up, each as large as the export.
    for stale in [*final.parent.glob(f".{final.name}.tmp-*"), *final.parent.glob(f".{final.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        # os.replace cannot replace a non-empty folder: move the old one aside first.
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_files(seg_path: Path, image_path: Path, out_dir: Path, params: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Write ``out_dir``/image and ``out_dir``/segmentation (precomputed) and ``out_dir``/objects.json.

    ``seg_path``: seg.h5 (uint32 (z, y, x), optional pyramid s1..sN);
    ``image_path``: image.h5 (uint8, same shape). ``params``: the ``export``
    config section. Returns the objects.json record.
    """
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        raise EmmitoError(
            "emmito export needs tensorstore: pip install 'emmito[view]' (or pip install tensorstore)"
        ) from None
    with open_volume(image_path) as image, open_volume(seg_path) as seg:
        if image.dtype != np.uint8:
            raise EmmitoError(f"{image_path}: image is {image.dtype}, not uint8: rerun emmito convert on it")
        if tuple(seg.shape) != tuple(image.shape):
            raise EmmitoError(
                f"{seg_path} is {tuple(seg.shape)} but {image_path} is {tuple(image.shape)}: export the final, "
                "full-resolution seg.h5 (from emmito upsample) of the same volume"
            )
        if seg.dtype.kind not in "ui":
            raise EmmitoError(f"{seg_path}: labels are {seg.dtype}, not integers: export seg.h5 from emmito upsample")
        voxel_size = contract.voxel_size(volume_attrs(seg))
        shape = tuple(int(s) for s in image.shape)
        shapes = scale_shapes(shape, tuple(params["chunk_size"]), params["pyramid_levels"])
        seg_file = seg.file

        def seg_source(level: int, region: tuple[slice, slice, slice]) -> np.ndarray | None:
            name = contract.level_name(level)
            if name not in seg_file or tuple(seg_file[name].shape) != shapes[level]:
                return None
            return seg_file[name][region].astype(np.uint32, copy=False)

        def image_source(level: int, region: tuple[slice, slice, slice]) -> np.ndarray | None:
            return image[region] if level == 0 else None

        statistics = ObjectStatistics()
        with _atomic_directory(out_dir) as tmp:
            image_stores = _open_scales(tmp / IMAGE_LAYER, "image", "uint8", shapes, voxel_size, params)
            _write_layer(image_stores, shapes, image_source, mean_downsample, params["shard_chunks"], IMAGE_LAYER, progress)
            seg_stores = _open_scales(tmp / SEGMENTATION_LAYER, "segmentation", "uint32", shapes, voxel_size, params)
            _write_layer(
                seg_stores, shapes, seg_source, downsample_mode, params["shard_chunks"], SEGMENTATION_LAYER, progress,
                statistics=statistics,
            )
            del image_stores, seg_stores
            info_path = tmp / SEGMENTATION_LAYER / "info"
            info = json.loads(info_path.read_text())
            info["segment_properties"] = SEGMENT_PROPERTIES
            write_json(info_path, info)
            write_json(tmp / SEGMENTATION_LAYER / SEGMENT_PROPERTIES / "info", segment_properties(statistics.voxels, voxel_size))
            record = {
                "shape": list(shape),
                contract.VOXEL_SIZE: voxel_size,
                "scales": [list(s) for s in shapes],
                "layers": {"image": IMAGE_LAYER, "segmentation": SEGMENTATION_LAYER},
                "objects": statistics.record(),
            }
            write_json(tmp / OBJECTS_FILE, record)
    return record


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito export SEG IMAGE OUT_DIR``."""
    record = export_files(args.seg, args.image, args.out_dir, params["export"], progress=True)
    print(
        f"emmito export: {len(record['objects'])} objects, {len(record['scales'])} scales -> {args.out_dir} "
        f"(view it with: emmito view {args.out_dir})",
        file=sys.stderr,
    )
