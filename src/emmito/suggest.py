"""``emmito suggest``: what to proofread (or label) first, ranked, each with a neuroglancer view state.

suggestions.csv (``contract.Results.suggestions``, columns ``contract.SUGGESTION_COLUMNS``)
lists, per kind (``contract.SUGGESTION_KINDS``), at most ``suggest.rows_per_kind`` rows:

- ``uncertain_object``: objects by their mean uncertainty, the heat's
  ``contract.UNCERTAINTY_CHANNEL`` (infer.uncertainty) over their voxels;
- ``low_margin``: objects by their mean foreground margin |2p - 1| (lowest
  first: the network was least sure they are mitochondria);
- ``shape_outlier``: objects whose log volume or length (objects.csv) is more
  than ``suggest.outlier_z`` robust standard deviations (1.4826 x MAD) from
  the volume's median;
- ``weak_match``: cross-block matches (trace.json) scoring in
  [threshold, threshold + ``suggest.weak_match_margin``): joined, but only just;
- ``uncertain_region``: boxes of ``suggest.region`` voxels by summed
  uncertainty, for labelling from scratch (no segment).

Where the heat has no uncertainty channel, the foreground's 1 - |2p - 1|
stands in for it (in uint8, 255 - |2 heat - 255|): the region rows say so, and
there are no ``uncertain_object`` rows (they would repeat ``low_margin``'s).

Memory is bounded by a slab: the heat blocks (inference resolution) are read
``SLAB_SLICES`` slices at a time over the slices each block owns, with the
same slices of seg_infer.h5 (the traced labels, at the heat's resolution);
sums are integers (uint8 heat), so the file's bytes do not depend on the slab.
Rows give full-resolution voxels (seg.h5's frame: the export's) and a view
state (``view_state``) that ``emmito view NG_DIR --suggestion N`` applies.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emmito import contract
from emmito.decoders import HEAT_CHANNEL, resolve_decoder
from emmito.io import EmmitoError, atomic_path, open_volume, read_json, read_table, volume_attrs
from emmito.labels import read_objects

UNCERTAIN_OBJECT, LOW_MARGIN, SHAPE_OUTLIER, WEAK_MATCH, UNCERTAIN_REGION = contract.SUGGESTION_KINDS
SLAB_SLICES = 8  # slices of heat and labels read at a time (the HDF5 chunk depth)
MAD_SCALE = 1.4826  # the median absolute deviation of a normal distribution, in standard deviations
MIN_OBJECTS_FOR_OUTLIERS = 5  # fewer objects make no distribution to stand out of
# How a view frames its box (as emmito view frames the largest object): the box's larger y/x
# extent times the zoom factor fills VIEW_PIXELS screen pixels, never more than the whole slice;
# the 3D view is the projection factor times the box's largest extent high.
VIEW_PIXELS = 600
OBJECT_ZOOM, OBJECT_PROJECTION = 4.0, 3.0
REGION_ZOOM, REGION_PROJECTION = 1.25, 1.5
VIEW_DECIMALS = 6


# ---- view states -------------------------------------------------------------------


def box_position(box: list[int] | tuple[int, ...]) -> list[float]:
    """Viewer position (x, y, z in voxels) at the centre of ``box`` (z0, y0, x0, z1, y1, x1).

    The z is an integer slice plus 0.5 (a voxel's centre) so that the slice
    shown is exactly that slice.
    """
    z0, y0, x0, z1, y1, x1 = box
    return [(x0 + x1) / 2, (y0 + y1) / 2, (z0 + z1 - 1) // 2 + 0.5]


def box_zoom(box: list[int] | tuple[int, ...], shape: tuple[int, ...], factor: float, view_pixels: int = VIEW_PIXELS) -> float:
    """Voxels per screen pixel that show ``factor`` times the box's larger y/x extent, at most the whole slice."""
    z0, y0, x0, z1, y1, x1 = box
    return min(max(shape[1:]) / view_pixels, factor * max(y1 - y0, x1 - x0) / view_pixels)


def box_projection_scale(box: list[int] | tuple[int, ...], voxel_size: list[float], factor: float) -> float:
    """Height of the 3D view in the finest voxel's units: ``factor`` times the box's largest physical extent."""
    extents = [(high - low) * size for low, high, size in zip(box[:3], box[3:], voxel_size)]
    return factor * max(extents) / min(voxel_size)


def view_state(
    box: list[int], shape: tuple[int, ...], voxel_size: list[float], segment: int | None, zoom: float, projection: float
) -> dict[str, Any]:
    """A neuroglancer state fragment (``contract.SUGGESTION_VIEW_KEYS``) framing ``box`` (full-resolution voxels).

    ``segment``: the object to select (None: none selected, so every object shows).
    """
    segments = [] if segment is None else [str(int(segment))]
    return {
        "position": box_position(box),
        "crossSectionScale": round(box_zoom(box, shape, zoom), VIEW_DECIMALS),
        "projectionScale": round(box_projection_scale(box, voxel_size, projection), VIEW_DECIMALS),
        "layers": {contract.SUGGESTION_LAYER: {"segments": segments}},
    }


# ---- inputs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """The volume's frames: seg.h5's (full resolution) and seg_infer.h5's (the heat's)."""

    shape: tuple[int, int, int]  # seg.h5 (z, y, x)
    voxel_size: list[float]  # seg.h5's, nm
    heat_shape: tuple[int, int, int]  # seg_infer.h5 (z, y, x)
    factor: int  # y/x of seg.h5 per y/x of the heat (model.downsample_xy)


@dataclass(frozen=True)
class HeatBlock:
    """One heat block: volume slices [offset, offset + depth), of which it owns [offset, own_stop) (its overlap is the next's)."""

    path: Path
    offset: int
    depth: int
    own_stop: int
    foreground: int  # channel indices
    uncertainty: int | None


def read_frame(traced: Path, seg: Path) -> tuple[Frame, np.ndarray | None]:
    """The frames of seg_infer.h5 and seg.h5 (attributes only), and seg_infer.h5's object-score table (or None)."""
    with open_volume(traced) as ds:
        attrs = volume_attrs(ds)
        if ds.ndim != 3 or ds.dtype.kind != "u":
            raise EmmitoError(f"{traced}: {ds.dtype} {tuple(ds.shape)} is not uint (z, y, x) labels: rerun emmito trace")
        heat_shape, factor = tuple(int(n) for n in ds.shape), contract.downsample_xy(attrs)
        scores = read_table(ds, contract.OBJECT_SCORES, contract.OBJECT_SCORE_COLUMNS)
    with open_volume(seg) as ds:
        shape, voxel_size = tuple(int(n) for n in ds.shape), contract.voxel_size(volume_attrs(ds))
    if len(shape) != 3 or shape[0] != heat_shape[0] or any(abs(h * factor - n) >= factor for n, h in zip(shape[1:], heat_shape[1:])):
        raise EmmitoError(
            f"{seg}: shape {shape} is not {traced}'s {heat_shape} at {factor}x in y and x: "
            "they come from different runs; rerun emmito upsample"
        )
    return Frame(shape, voxel_size, heat_shape, factor), scores


def _heat_header(path: Path, frame: Frame) -> tuple[int, int, int, int | None, str | None]:
    """(offset, depth, foreground channel, uncertainty channel or None, uncertainty kind) of one heat block, checked."""
    with open_volume(path) as ds:
        attrs = volume_attrs(ds)
        if ds.ndim != 4 or ds.dtype != np.uint8:
            raise EmmitoError(f"{path}: {ds.dtype} {tuple(ds.shape)} is not a uint8 (channel, z, y, x) heat block: rerun emmito merge")
        names = contract.channel_names(attrs) or ([HEAT_CHANNEL] if ds.shape[0] == 1 else [])
        foreground = resolve_decoder("auto", names)[1]
        if foreground not in names:
            raise EmmitoError(f"{path}: no '{foreground}' channel (channels {names}): suggest needs the foreground; rerun infer")
        depth = contract.volume_depth(attrs)
        if depth != frame.heat_shape[0] or tuple(ds.shape[2:]) != frame.heat_shape[1:] or contract.downsample_xy(attrs) != frame.factor:
            raise EmmitoError(
                f"{path}: (depth {depth}, y/x {tuple(ds.shape[2:])}, downsample_xy {contract.downsample_xy(attrs)}) differ from "
                f"seg_infer.h5's ({frame.heat_shape[0]}, {frame.heat_shape[1:]}, {frame.factor}): it is from another run; rerun the workflow"
            )
        uncertainty = names.index(contract.UNCERTAINTY_CHANNEL) if contract.UNCERTAINTY_CHANNEL in names else None
        kind = attrs.get(contract.UNCERTAINTY_KIND)
        return contract.offset(attrs), int(ds.shape[1]), names.index(foreground), uncertainty, None if kind is None else str(kind)


def heat_blocks(paths: list[Path], frame: Frame) -> tuple[list[HeatBlock], str | None]:
    """The heat blocks in volume order, each with the slices it owns, checked to cover the volume once; and the uncertainty kind.

    The kind is the heat's ``contract.UNCERTAINTY_KIND`` (infer.uncertainty:
    tta_std, entropy; "kind not recorded" where the blocks have the channel but
    do not say which), None without the channel.
    """
    if not paths:
        raise EmmitoError("no heat blocks given: pass every results/<vol>/heat/block_<b>.h5 with --heat")
    headers = sorted(((*_heat_header(Path(p), frame), Path(p)) for p in paths), key=lambda h: h[0])
    blocks: list[HeatBlock] = []
    for i, (offset, depth, foreground, uncertainty, _, path) in enumerate(headers):
        own_stop = headers[i + 1][0] if i + 1 < len(headers) else frame.heat_shape[0]
        expected = blocks[-1].own_stop if blocks else 0
        if offset != expected or own_stop <= offset:
            raise EmmitoError(
                f"{path}: starts at slice {offset}, but the blocks before it end at slice {expected}: "
                "pass every heat block of the volume, each once"
            )
        if own_stop > offset + depth:
            raise EmmitoError(
                f"{path}: holds slices {offset}-{offset + depth - 1}, but slices up to {own_stop - 1} are in no later "
                "heat block: pass every heat block of the volume"
            )
        if (uncertainty is None) != (headers[0][3] is None):
            raise EmmitoError(
                f"{path}: some heat blocks have a '{contract.UNCERTAINTY_CHANNEL}' channel and some not ({headers[0][5]}): "
                "rerun infer and merge for the whole volume"
            )
        blocks.append(HeatBlock(path, offset, depth, own_stop, foreground, uncertainty))
    kind = None if headers[0][3] is None else headers[0][4] or "kind not recorded"
    return blocks, kind


def read_trace(path: Path) -> dict[str, Any]:
    """trace.json's record, checked to hold the objects and the scored matches (trace version 3 on)."""
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("objects"), dict):
        raise EmmitoError(f"{path}: not an emmito trace record (no 'objects'): rerun emmito trace")
    if not isinstance(record.get("matches"), list) or not isinstance(record.get("matching"), dict):
        raise EmmitoError(f"{path}: no scored 'matches' (an emmito before trace version 3 wrote it): rerun emmito trace")
    return record


# ---- the scan ------------------------------------------------------------------------


@dataclass
class Scan:
    """Sums over seg_infer.h5's voxels (heat resolution), per object id (index) and per region box."""

    voxels: np.ndarray  # int64 (n + 1,)
    foreground: np.ndarray  # sum of the foreground heat (0-255 per voxel)
    margin: np.ndarray  # sum of |2 heat - 255|
    uncertainty: np.ndarray  # sum of the uncertainty channel, or of 255 - |2 heat - 255| without it
    regions: np.ndarray  # int64 (nz, ny, nx): uncertainty summed per region box
    region: tuple[int, int, int]  # the region box at the heat's resolution
    # objects to find near a block face: id -> [z lo, z hi) to look in, and the box found there (heat frame)
    watch: dict[int, tuple[int, int]] = field(default_factory=dict)
    found: dict[int, list[int]] = field(default_factory=dict)


def new_scan(frame: Frame, n_objects: int, region: list[int], watch: dict[int, tuple[int, int]]) -> Scan:
    box = (int(region[0]), max(1, int(region[1]) // frame.factor), max(1, int(region[2]) // frame.factor))
    grid = tuple(-(-n // b) for n, b in zip(frame.heat_shape, box))
    zeros = [np.zeros(n_objects + 1, np.int64) for _ in range(4)]
    return Scan(*zeros, np.zeros(grid, np.int64), box, dict(watch))


def _bincount(ids: np.ndarray, weights: np.ndarray | None, size: int) -> np.ndarray:
    counts = np.bincount(ids, weights=weights, minlength=size)
    return np.rint(counts).astype(np.int64) if weights is not None else counts.astype(np.int64)


def add_slab(scan: Scan, z_start: int, labels: np.ndarray, heat: np.ndarray, uncertainty: np.ndarray | None, where: Path) -> None:
    """Add one slab (``labels`` uint (z, y, x) of seg_infer.h5 from volume slice ``z_start``, ``heat`` its foreground) to ``scan``."""
    margin = np.abs(2 * heat.astype(np.int16) - contract.HEAT_MAX)
    if uncertainty is None:
        uncertainty = contract.HEAT_MAX - margin
    labelled = labels != 0
    ids = labels[labelled].astype(np.intp)
    size = len(scan.voxels)
    if len(ids) and int(ids.max()) >= size:
        raise EmmitoError(
            f"{where}: holds id {int(ids.max())}, but trace.json has {size - 1} objects: they come from different runs; rerun emmito trace"
        )
    scan.voxels += _bincount(ids, None, size)
    scan.foreground += _bincount(ids, heat[labelled], size)
    scan.margin += _bincount(ids, margin[labelled], size)
    scan.uncertainty += _bincount(ids, uncertainty[labelled], size)
    rz, ry, rx = scan.region
    tiles = np.add.reduceat(uncertainty, np.arange(0, labels.shape[1], ry), axis=1, dtype=np.int64)
    tiles = np.add.reduceat(tiles, np.arange(0, labels.shape[2], rx), axis=2)
    np.add.at(scan.regions, (np.arange(z_start, z_start + labels.shape[0]) // rz,), tiles)
    for label, (low, high) in scan.watch.items():
        lo, hi = max(low, z_start), min(high, z_start + labels.shape[0])
        if lo >= hi:
            continue
        z, y, x = np.nonzero(labels[lo - z_start : hi - z_start] == label)
        if len(z):
            box = [int(z.min()) + lo, int(y.min()), int(x.min()), int(z.max()) + lo + 1, int(y.max()) + 1, int(x.max()) + 1]
            old = scan.found.get(label, box)
            scan.found[label] = [min(a, b) for a, b in zip(old[:3], box[:3])] + [max(a, b) for a, b in zip(old[3:], box[3:])]


def scan_volume(traced: Path, blocks: list[HeatBlock], scan: Scan) -> Scan:
    """Read every block's owned slices, ``SLAB_SLICES`` at a time, with the same slices of seg_infer.h5, into ``scan``."""
    with open_volume(traced) as labels:
        for block in blocks:
            with open_volume(block.path) as heat:
                for start in range(block.offset, block.own_stop, SLAB_SLICES):
                    stop = min(start + SLAB_SLICES, block.own_stop)
                    local = slice(start - block.offset, stop - block.offset)
                    foreground = heat[block.foreground, local]
                    uncertainty = None if block.uncertainty is None else heat[block.uncertainty, local]
                    add_slab(scan, start, labels[start:stop], foreground, uncertainty, traced)
    return scan


# ---- rows ----------------------------------------------------------------------------


def _object_boxes(objects: list[dict[str, Any]], frame: Frame) -> dict[int, list[int]]:
    """Each object's bounding box in full-resolution voxels, from objects.csv's nm."""
    names = ("bbox_z0_nm", "bbox_y0_nm", "bbox_x0_nm", "bbox_z1_nm", "bbox_y1_nm", "bbox_x1_nm")
    sizes = frame.voxel_size * 2
    return {int(row["id"]): [int(round(row[n] / s)) for n, s in zip(names, sizes)] for row in objects}


def _row(kind: str, rank: int, reason: str, segment: int | None, score: float, box: list[int], state: dict[str, Any]) -> dict[str, Any]:
    x, y, z = state["position"]
    return {
        "kind": kind, "kind_rank": rank, "reason": reason, "segment_id": "" if segment is None else int(segment),
        "score": f"{score:.6f}", "z": int(math.floor(z)), "y": int(math.floor(y)), "x": int(math.floor(x)),
        "z0": box[0], "y0": box[1], "x0": box[2], "z1": box[3], "y1": box[4], "x1": box[5],
        "view_state": json.dumps(state, sort_keys=True, separators=(",", ":")),
    }


def _object_row(
    kind: str, rank: int, reason: str, label: int, score: float, boxes: dict[int, list[int]], frame: Frame, where: Path
) -> dict[str, Any]:
    if label not in boxes:
        raise EmmitoError(f"{where}: has no row for object {label} of seg_infer.h5: it is from another run; rerun emmito measure")
    box = boxes[label]
    return _row(kind, rank, reason, label, score, box, view_state(box, frame.shape, frame.voxel_size, label, OBJECT_ZOOM, OBJECT_PROJECTION))


def object_rows(
    scan: Scan, uncertainty_kind: str | None, count: int, boxes: dict[int, list[int]], frame: Frame, where: Path
) -> list[dict[str, Any]]:
    """The uncertain_object (with an uncertainty channel) and low_margin rows."""
    ids = np.flatnonzero(scan.voxels)
    ids = ids[ids > 0]
    full = contract.HEAT_MAX * scan.voxels[ids].astype(np.float64)
    rows = []
    if uncertainty_kind is not None:
        mean = scan.uncertainty[ids] / full
        for rank, i in enumerate(np.lexsort((ids, -mean))[:count], start=1):
            label = int(ids[i])
            reason = f"mean uncertainty {mean[i]:.3f} over the object (heat channel {contract.UNCERTAINTY_CHANNEL}: {uncertainty_kind})"
            rows.append(_object_row(UNCERTAIN_OBJECT, rank, reason, label, float(mean[i]), boxes, frame, where))
    closeness = 1.0 - scan.margin[ids] / full
    for rank, i in enumerate(np.lexsort((ids, -closeness))[:count], start=1):
        label = int(ids[i])
        reason = (f"mean foreground margin |2p - 1| {1 - closeness[i]:.3f} over the object (mean p {scan.foreground[label] / full[i]:.3f}): "
                  "the lower, the less sure the network was that it is a mitochondrion")
        rows.append(_object_row(LOW_MARGIN, rank, reason, label, float(closeness[i]), boxes, frame, where))
    return rows


def robust_z(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(|x - median| / (1.4826 MAD), median, robust SD) of ``values``; z 0 everywhere where the MAD is 0."""
    median = float(np.median(values))
    sd = MAD_SCALE * float(np.median(np.abs(values - median)))
    if sd == 0:
        return np.zeros(len(values)), median, sd
    return np.abs(values - median) / sd, median, sd


def shape_rows(objects: list[dict[str, Any]], limit: float, count: int, boxes: dict[int, list[int]], frame: Frame) -> list[dict[str, Any]]:
    """The shape_outlier rows: log volume or length more than ``limit`` robust SDs from the median."""
    objects = [row for row in objects if row["volume_um3"] > 0]
    if len(objects) < MIN_OBJECTS_FOR_OUTLIERS:
        return []
    ids = np.array([int(row["id"]) for row in objects])
    volume = np.array([row["volume_um3"] for row in objects], dtype=np.float64)
    length = np.array([row["length_um"] for row in objects], dtype=np.float64)
    z_volume, median_volume, _ = robust_z(np.log(volume))
    z_length, median_length, _ = robust_z(length)
    score = np.maximum(z_volume, z_length)
    chosen = [i for i in np.lexsort((ids, -score)) if score[i] > limit][:count]
    rows = []
    for rank, i in enumerate(chosen, start=1):
        parts = []
        if z_volume[i] > limit:
            side = "above" if volume[i] > math.exp(median_volume) else "below"
            parts.append(
                f"volume {volume[i]:.4f} um3 is {z_volume[i]:.1f} robust SDs (of log volume) {side} the median {math.exp(median_volume):.4f} um3"
            )
        if z_length[i] > limit:
            side = "above" if length[i] > median_length else "below"
            parts.append(f"length {length[i]:.3f} um is {z_length[i]:.1f} robust SDs {side} the median {median_length:.3f} um")
        if objects[i]["touches_edge"]:
            parts.append("it touches the volume's edge (cut)")
        box = boxes[int(ids[i])]
        state = view_state(box, frame.shape, frame.voxel_size, int(ids[i]), OBJECT_ZOOM, OBJECT_PROJECTION)
        rows.append(_row(SHAPE_OUTLIER, rank, "; ".join(parts), int(ids[i]), float(score[i]), box, state))
    return rows


def weak_matches(record: dict[str, Any], margin: float, count: int) -> list[dict[str, Any]]:
    """trace.json's matches scoring in [threshold, threshold + margin), weakest first (ties: block, ids)."""
    threshold = float(record["matching"]["threshold"])
    weak = [m for m in record["matches"] if threshold <= float(m["score"]) < threshold + margin]
    return sorted(weak, key=lambda m: (float(m["score"]), int(m["block"]), int(m["id_a"]), int(m["id_b"])))[:count]


def face_windows(matches: list[dict[str, Any]], blocks: list[HeatBlock]) -> dict[int, tuple[int, int]]:
    """Per weakly matched object, the slices [lo, hi) the two blocks share (heat frame), where the view should look."""
    windows: dict[int, tuple[int, int]] = {}
    for match in matches:
        b = int(match["block"])
        if b + 1 >= len(blocks):
            continue
        face, overlap = blocks[b].own_stop, blocks[b].offset + blocks[b].depth - blocks[b].own_stop
        window = (face, face + overlap) if overlap > 0 else (face - 1, face + 1)
        windows.setdefault(int(match["object"]), window)
    return windows


def match_rows(
    matches: list[dict[str, Any]], record: dict[str, Any], scan: Scan, boxes: dict[int, list[int]], frame: Frame, where: Path
) -> list[dict[str, Any]]:
    """The weak_match rows, each centred where the object crosses the block face (else on the object)."""
    criterion, threshold = record["matching"]["criterion"], float(record["matching"]["threshold"])
    rows = []
    for rank, match in enumerate(matches, start=1):
        label, b = int(match["object"]), int(match["block"])
        reason = (f"blocks {b} and {b + 1} joined their objects {match['id_a']} and {match['id_b']} at {criterion} "
                  f"{float(match['score']):.3f}, just above trace.threshold {threshold:g}: check it is one object")
        row = _object_row(WEAK_MATCH, rank, reason, label, float(match["score"]), boxes, frame, where)
        if label in scan.found:
            f = frame.factor
            z0, y0, x0, z1, y1, x1 = scan.found[label]
            crossing = [z0, y0 * f, x0 * f, z1, min(y1 * f, frame.shape[1]), min(x1 * f, frame.shape[2])]
            state = view_state(crossing, frame.shape, frame.voxel_size, label, OBJECT_ZOOM, OBJECT_PROJECTION)
            row = _row(WEAK_MATCH, rank, reason, label, float(match["score"]), boxes[label], state)
        rows.append(row)
    return rows


def region_rows(scan: Scan, uncertainty_kind: str | None, count: int, frame: Frame) -> list[dict[str, Any]]:
    """The uncertain_region rows: the region boxes with the most summed uncertainty (none where it is 0)."""
    flat = scan.regions.reshape(-1)
    order = [i for i in np.lexsort((np.arange(len(flat)), -flat)) if flat[i] > 0][:count]
    source = (f"heat channel {contract.UNCERTAINTY_CHANNEL}: {uncertainty_kind}" if uncertainty_kind is not None
              else "no uncertainty channel in the heat: 1 - |2p - 1| of the foreground instead")
    rz, ry, rx = scan.region
    f = frame.factor
    rows = []
    for rank, i in enumerate(order, start=1):
        zi, yi, xi = np.unravel_index(i, scan.regions.shape)
        box = [int(zi) * rz, int(yi) * ry * f, int(xi) * rx * f]
        box += [min(box[0] + rz, frame.shape[0]), min(box[1] + ry * f, frame.shape[1]), min(box[2] + rx * f, frame.shape[2])]
        total = float(flat[i]) / contract.HEAT_MAX * f * f
        voxels = (box[3] - box[0]) * (box[4] - box[1]) * (box[5] - box[2])
        reason = (f"summed uncertainty {total:.1f} in this {box[3] - box[0]} x {box[4] - box[1]} x {box[5] - box[2]} box "
                  f"({total / voxels:.3f} per voxel; {source}): label it from scratch")
        state = view_state(box, frame.shape, frame.voxel_size, None, REGION_ZOOM, REGION_PROJECTION)
        rows.append(_row(UNCERTAIN_REGION, rank, reason, None, total, box, state))
    return rows


def interleave(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every kind's first row, then every kind's second, ... (kinds in ``contract.SUGGESTION_KINDS`` order), ranked from 1."""
    order = sorted(rows, key=lambda r: (r["kind_rank"], contract.SUGGESTION_KINDS.index(r["kind"])))
    return [{"rank": rank, **row} for rank, row in enumerate(order, start=1)]


# ---- the file ------------------------------------------------------------------------


def suggestions_text(rows: list[dict[str, Any]]) -> str:
    """suggestions.csv's text: the header (``contract.SUGGESTION_COLUMNS``), one line per row, "\\n" line ends."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(contract.SUGGESTION_COLUMNS)
    for row in rows:
        writer.writerow([row[column] for column in contract.SUGGESTION_COLUMNS])
    return buffer.getvalue()


def write_suggestions(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    text = suggestions_text(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def suggestion_row(path: str | os.PathLike, number: int) -> dict[str, Any]:
    """The row of rank ``number`` of suggestions.csv (``read_suggestions``'); one-line EmmitoError when there is none."""
    rows = read_suggestions(path)
    for row in rows:
        if row["rank"] == str(number):
            return row
    raise EmmitoError(f"{path}: no suggestion {number}: it has {len(rows)} rows, ranked 1 to {len(rows)}; pick one of those")


def read_suggestions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """suggestions.csv's rows as dicts of strings, with "view_state" parsed; one-line EmmitoError naming the file."""
    path = Path(path)
    if not path.exists():
        raise EmmitoError(
            f"{path}: file not found: run the suggest rule (snakemake {contract.Results().suggestions('<vol>')}) "
            "or 'emmito suggest' first, or pass --suggestions"
        )
    try:
        reader = csv.DictReader(io.StringIO(path.read_text()))
        rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EmmitoError(f"{path}: cannot read it ({exc}): delete it and rerun emmito suggest") from None
    if tuple(reader.fieldnames or ()) != contract.SUGGESTION_COLUMNS:
        raise EmmitoError(
            f"{path}: not an emmito suggestions table (its header is not {','.join(contract.SUGGESTION_COLUMNS[:3])},...): "
            "rerun emmito suggest"
        )
    for number, row in enumerate(rows, start=2):
        try:
            row["view_state"] = json.loads(row["view_state"])
        except (TypeError, json.JSONDecodeError):
            raise EmmitoError(f"{path}: line {number}'s view_state is not JSON: rerun emmito suggest") from None
    return rows


def suggest_files(
    out: Path, traced: Path, seg: Path, objects_csv: Path, trace_json: Path, heat: list[Path], params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Write suggestions.csv (``out``) from the workflow's files; ``params``: a complete ``suggest`` section. Returns the rows."""
    frame, scores = read_frame(Path(traced), Path(seg))
    blocks, uncertainty_kind = heat_blocks([Path(p) for p in heat], frame)
    record = read_trace(Path(trace_json))
    objects = read_objects(objects_csv)
    count = params["rows_per_kind"]
    weak = weak_matches(record, params["weak_match_margin"], count)
    scan = scan_volume(Path(traced), blocks, new_scan(frame, len(record["objects"]), params["region"], face_windows(weak, blocks)))
    if scores is not None and (len(scores) != len(scan.voxels) - 1 or not np.array_equal(scores[:, 1], scan.voxels[1:])):
        raise EmmitoError(f"{traced}: its object scores do not count the voxels of its labels against {trace_json}: rerun emmito trace")
    boxes = _object_boxes(objects, frame)
    rows = object_rows(scan, uncertainty_kind, count, boxes, frame, Path(objects_csv))
    rows += shape_rows(objects, params["outlier_z"], count, boxes, frame)
    rows += match_rows(weak, record, scan, boxes, frame, Path(objects_csv))
    rows += region_rows(scan, uncertainty_kind, count, frame)
    rows = interleave(rows)
    write_suggestions(out, rows)
    return rows


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito suggest OUT --traced SEG_INFER --seg SEG --objects CSV --trace JSON --heat BLOCK... --params JSON``."""
    rows = suggest_files(args.out, args.traced, args.seg, args.objects, args.trace, list(args.heat), params["suggest"])
    kinds = {kind: sum(row["kind"] == kind for row in rows) for kind in contract.SUGGESTION_KINDS}
    print(f"emmito suggest: {len(rows)} suggestions ({', '.join(f'{k} {n}' for k, n in kinds.items())}) -> {args.out}", file=sys.stderr)
