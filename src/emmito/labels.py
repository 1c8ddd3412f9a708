"""Label tables: remapping ids through a lookup table, renumbering, size filters; per-object statistics and objects.csv.

Shared by the decoders (consecutive ids after a filter), trace (block-local to
global ids) and anything else that rewrites ids. fastremap does the remapping
in place, so a block needs no second block-sized array.

``ObjectStatistics`` counts voxels and bounding boxes region by region (measure,
export); ``slice_heat_sums`` sums a heatmap over each object's voxels slice by
slice (segment's object scores, ``contract.SLICE_SCORES``); ``write_objects`` / ``read_objects`` write and read objects.csv
(``contract.OBJECT_COLUMNS``), the table of every object the measure stage makes.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import cc3d
import fastremap
import numpy as np

from emmito import contract
from emmito.io import EmmitoError, atomic_path

# Components of a label volume use face (6-) connectivity everywhere in emmito.
CONNECTIVITY = 6


def apply_lut(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Replace every label ``l`` in ``labels`` by ``lut[l]``, in place where possible.

    ``labels`` and ``lut`` are unsigned integer arrays of one dtype; returns the
    remapped array (``labels`` itself when it is contiguous).
    """
    lut = lut.astype(labels.dtype, copy=False)
    if not labels.flags.c_contiguous:
        labels = np.ascontiguousarray(labels)
    # fastremap's array remap takes 1-D input; reshape of a contiguous array is a view.
    fastremap.remap_from_array(labels.reshape(-1), lut, in_place=True)
    return labels


def keep_lut(keep: np.ndarray) -> np.ndarray:
    """uint32 lookup table mapping the ids where ``keep`` (bool, one entry per id, id 0 first) to 1, 2, ... in order, the rest to 0."""
    keep = np.asarray(keep, dtype=bool).copy()
    keep[0] = False
    lut = np.zeros(len(keep), dtype=np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return lut


def relabel_components(labels: np.ndarray, min_size: int) -> np.ndarray:
    """6-connected components of a multi-label volume (uint32 (z, y, x)), those below ``min_size`` removed.

    Voxels of different labels never join, and one label in two separate
    places becomes two objects. Returns uint32 ids consecutive from 1 in scan order.
    """
    components, count = cc3d.connected_components(labels, connectivity=CONNECTIVITY, return_N=True, out_dtype=np.uint32)
    sizes = np.bincount(components.reshape(-1), minlength=count + 1)
    # In place: a second block-sized array is what bounds memory here.
    return apply_lut(components, keep_lut(sizes >= max(1, min_size)))


def drop_wide_objects(labels: np.ndarray, max_area: int) -> np.ndarray:
    """Remove objects whose area in some slice exceeds ``max_area`` pixels; ids stay consecutive from 1.

    ``labels``: uint32 (z, y, x) ids consecutive from 1 (a decoder's output),
    changed in place and returned. ``max_area`` 0 keeps everything. One pass
    over the slices; memory: a few arrays of (objects + 1) entries.
    """
    count = int(labels.max()) if labels.size else 0
    if max_area <= 0 or count == 0:
        return labels
    widest = np.zeros(count + 1, dtype=np.int64)
    for plane in labels:
        np.maximum(widest, np.bincount(plane.reshape(-1), minlength=count + 1), out=widest)
    keep = widest <= max_area
    if keep[1:].all():
        return labels
    return apply_lut(labels, keep_lut(keep))


def slice_heat_sums(labels: np.ndarray, heat: Any, slab_slices: int = 8) -> np.ndarray:
    """Per (object, slice): its voxels and the sum of ``heat`` over them, as int64 rows (id, z, voxels, heat_sum).

    ``labels``: uint (z, y, x) ids, 0 = background; ``heat``: uint8 (z, y, x)
    of the same shape, an array or a lazy one (an h5py dataset, a heat
    channel) read ``slab_slices`` slices at a time, so memory beyond
    ``labels`` is a slab. Rows in (z, id) order (``contract.SLICE_SCORE_COLUMNS``);
    the sums are exact (integers). An object's mean heat over any set of its
    slices is then the sum of those rows' heat_sum over their voxels.
    """
    if tuple(heat.shape) != tuple(labels.shape):
        raise ValueError(f"labels {labels.shape} and heat {tuple(heat.shape)} differ in shape")
    rows = [np.zeros((0, 4), np.int64)]
    for z_start in range(0, labels.shape[0], slab_slices):
        heat_slab = np.asarray(heat[z_start : z_start + slab_slices])
        for k in range(heat_slab.shape[0]):
            plane = labels[z_start + k].reshape(-1)
            inside = np.flatnonzero(plane)
            if len(inside) == 0:
                continue
            ids = plane[inside].astype(np.int64)
            counts = np.bincount(ids)
            sums = np.bincount(ids, weights=heat_slab[k].reshape(-1)[inside])
            present = np.flatnonzero(counts)
            rows.append(np.stack(
                [present, np.full(len(present), z_start + k), counts[present], np.rint(sums[present])], axis=1
            ).astype(np.int64))
    return np.concatenate(rows)


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


# ---- objects.csv ---------------------------------------------------------------------
# The unit at the end of a column's name fixes its decimals (so the same values give the same
# bytes); a column without one holds integers.
UNIT_DECIMALS = {"_um3": 9, "_um2": 6, "_um": 6, "_nm": 3}


def column_decimals(column: str) -> int | None:
    """Decimals objects.csv writes ``column`` with, or None for an integer column."""
    for suffix, decimals in UNIT_DECIMALS.items():
        if column.endswith(suffix):
            return decimals
    return None


def _cell(column: str, value: Any) -> str:
    decimals = column_decimals(column)
    if decimals is None:
        return str(int(value))
    return f"{float(value):.{decimals}f}"


def objects_csv_text(rows: list[dict[str, Any]]) -> str:
    """objects.csv's text: the header (contract.OBJECT_COLUMNS), then one line per row in ascending id order."""
    lines = [",".join(contract.OBJECT_COLUMNS)]
    for row in sorted(rows, key=lambda r: int(r["id"])):
        lines.append(",".join(_cell(column, row[column]) for column in contract.OBJECT_COLUMNS))
    return "\n".join(lines) + "\n"


def write_objects(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Write objects.csv (``objects_csv_text``) atomically. Each row has every column of contract.OBJECT_COLUMNS."""
    text = objects_csv_text(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_objects(path: str | os.PathLike) -> list[dict[str, Any]]:
    """objects.csv's rows as dicts: ints for the integer columns (id, voxels, slices, blocks, touches_edge), floats otherwise.

    A missing file, another header or a value that is not a number raise a
    one-line EmmitoError naming the file and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise EmmitoError(f"{path}: file not found: run 'emmito measure' (or the measure rule) first, or fix the path")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise EmmitoError(f"{path}: cannot read it ({exc}): delete it and rerun 'emmito measure'") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(header) != contract.OBJECT_COLUMNS:
        raise EmmitoError(
            f"{path}: not an emmito objects table (its header is not {','.join(contract.OBJECT_COLUMNS[:3])},...): "
            "rerun 'emmito measure' to rewrite it"
        )
    rows = []
    for number, cells in enumerate(reader, start=2):
        if not cells:
            continue
        if len(cells) != len(header):
            raise EmmitoError(f"{path}: line {number} has {len(cells)} values, not {len(header)}: rerun 'emmito measure'")
        try:
            rows.append(
                {c: (int(v) if column_decimals(c) is None else float(v)) for c, v in zip(header, cells)}
            )
        except ValueError:
            raise EmmitoError(f"{path}: line {number} holds a value that is not a number: rerun 'emmito measure'") from None
    return rows
