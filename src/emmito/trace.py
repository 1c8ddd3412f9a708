"""Block-local ids -> one volume of global ids, matching objects in the block overlaps.

Block b holds slices [b*B, (b+1)*B + overlap); the overlap slices also belong to
block b+1, which owns them. Objects of block b and block b+1 that overlap
enough inside that shared slab are the same object. A union-find over all
(block, local id) nodes joins the matches of every block pair, so an object
that runs through many blocks resolves to one id.

Two passes, one block in memory at a time:
1. read each block once: match its head with the previous block's tail (the
   only slices kept from one block to the next) and take the statistics of the
   slices it owns (ids, voxel counts, bounding boxes);
2. read each block's owned slices again, remap them to global ids, write them.

Object scores (``contract.SLICE_SCORES`` in the blocks, where segment wrote
them): the rows of the slices each block owns are summed per global id into
seg_infer.h5's ``contract.OBJECT_SCORES`` (``traced_scores``), so a traced
object's mean foreground heat is over exactly its voxels, whichever blocks
its parts came from (the voxel-weighted mean of the parts).

trace.json (the record ``trace`` returns): "blocks"; "objects" (per global id:
voxels, bbox, blocks); "id_map" (per block, local id -> global id);
"matching" (the criterion and threshold it matched with) and "matches" (every
cross-block match with its overlap score, ``match_record``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastremap
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph
from tqdm import tqdm

from emmito import contract
from emmito.blocks import Layout
from emmito.io import EmmitoError, create_volume, open_volume, read_table, read_volume, volume_attrs, write_json, write_table
from emmito.labels import apply_lut

# Reads slices [start, stop) (block-local indices) of block b: (b, start, stop) -> uint32 (z, y, x).
BlockReader = Callable[[int, int, int], np.ndarray]
# Block b's score rows (contract.SLICE_SCORE_COLUMNS: id, z, voxels, heat_sum), or None where it has none.
ScoreReader = Callable[[int], "np.ndarray | None"]


def overlap_scores(slab_a: np.ndarray, slab_b: np.ndarray, criterion: str = "iou") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids in slab_a, ids in slab_b, scores) of every pair of objects that share a voxel, sorted by pair.

    ``slab_a`` and ``slab_b``: uint32 (z, y, x) labels of the same slices as
    seen by two blocks (0 = background). The score of a pair, computed in 3D
    over the slab, is IoU (``criterion="iou"``) or intersection over the
    smaller of the two (``"ioa"``).
    """
    if slab_a.shape != slab_b.shape:
        raise ValueError(f"overlap slabs differ in shape: {slab_a.shape} vs {slab_b.shape}")
    if criterion not in ("iou", "ioa"):
        raise ValueError(f"criterion must be 'iou' or 'ioa', not {criterion!r}")
    a = slab_a.reshape(-1)
    b = slab_b.reshape(-1)
    both = (a != 0) & (b != 0)
    if not both.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64)
    # One 64-bit key per (a, b) pair: counting keys counts intersections in C.
    keys = (a[both].astype(np.uint64) << np.uint64(32)) | b[both].astype(np.uint64)
    pair_keys, intersections = fastremap.unique(keys, return_counts=True)
    ids_a, sizes_a = fastremap.unique(a[a != 0], return_counts=True)
    ids_b, sizes_b = fastremap.unique(b[b != 0], return_counts=True)
    pair_a = (pair_keys >> np.uint64(32)).astype(np.int64)
    pair_b = (pair_keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    size_a = sizes_a[np.searchsorted(ids_a, pair_a)].astype(np.float64)
    size_b = sizes_b[np.searchsorted(ids_b, pair_b)].astype(np.float64)
    intersections = intersections.astype(np.float64)
    if criterion == "iou":
        score = intersections / (size_a + size_b - intersections)
    else:
        score = intersections / np.minimum(size_a, size_b)
    return pair_a, pair_b, score


def scored_matches(
    slab_a: np.ndarray, slab_b: np.ndarray, criterion: str = "iou", threshold: float = 0.5
) -> list[tuple[int, int, float]]:
    """(id in slab_a, id in slab_b, score) of the pairs scoring >= ``threshold`` (``overlap_scores``), sorted.

    Every pair, not only the best per object, so that a merge seen by one
    block joins the objects in the other.
    """
    pair_a, pair_b, score = overlap_scores(slab_a, slab_b, criterion)
    chosen = score >= threshold
    return list(zip(pair_a[chosen].tolist(), pair_b[chosen].tolist(), score[chosen].tolist()))


def match_overlap(
    slab_a: np.ndarray, slab_b: np.ndarray, criterion: str = "iou", threshold: float = 0.5
) -> list[tuple[int, int]]:
    """Pairs (id in slab_a, id in slab_b) of objects that are the same object: ``scored_matches`` without the scores."""
    return [(a, b) for a, b, _ in scored_matches(slab_a, slab_b, criterion, threshold)]


def resolve_ids(
    block_ids: list[np.ndarray], owned_ids: list[np.ndarray], matches: list[list[tuple[int, int]]]
) -> list[dict[int, int]]:
    """Global ids for the (block, local id) nodes, joining matched nodes.

    ``block_ids[b]``: sorted local ids (no 0) seen anywhere in block b;
    ``owned_ids[b]``: those present in the slices block b owns;
    ``matches[b]``: pairs (id in block b, id in block b+1).
    Returns, per block, {local id: global id}. Global ids are consecutive from
    1 in order of first appearance by (block, local id) among owned nodes; an
    object seen only in overlap slices that matched nothing gets no id (its
    voxels belong to the next block, which labels them itself).
    """
    node_start = np.concatenate([[0], np.cumsum([len(ids) for ids in block_ids])]).astype(np.int64)
    n_nodes = int(node_start[-1])
    sources: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for b, pairs in enumerate(matches):
        if not pairs:
            continue
        pair_array = np.asarray(pairs, dtype=np.int64)
        sources.append(node_start[b] + np.searchsorted(block_ids[b], pair_array[:, 0]))
        targets.append(node_start[b + 1] + np.searchsorted(block_ids[b + 1], pair_array[:, 1]))
    source = np.concatenate(sources) if sources else np.zeros(0, np.int64)
    target = np.concatenate(targets) if targets else np.zeros(0, np.int64)
    # Connected components of the match graph are the union-find's sets, in C.
    graph = sparse.coo_matrix((np.ones(len(source), np.int8), (source, target)), shape=(n_nodes, n_nodes))
    n_sets, set_of_node = csgraph.connected_components(graph, directed=False)

    owned_nodes = np.concatenate(
        [node_start[b] + np.searchsorted(block_ids[b], owned) for b, owned in enumerate(owned_ids)]
    ).astype(np.int64) if owned_ids else np.zeros(0, np.int64)
    first_owned = np.full(n_sets, n_nodes, dtype=np.int64)
    np.minimum.at(first_owned, set_of_node[owned_nodes], owned_nodes)
    has_id = first_owned < n_nodes
    order = np.argsort(first_owned[has_id], kind="stable")
    global_of_set = np.zeros(n_sets, dtype=np.int64)
    global_of_set[np.flatnonzero(has_id)[order]] = np.arange(1, int(has_id.sum()) + 1)

    id_maps: list[dict[int, int]] = []
    for b, ids in enumerate(block_ids):
        globals_ = global_of_set[set_of_node[node_start[b] : node_start[b + 1]]]
        keep = globals_ > 0
        id_maps.append(dict(zip(ids[keep].tolist(), globals_[keep].tolist())))
    return id_maps


@dataclass
class OwnedStatistics:
    """Per local id of one block, over the slices it owns: voxel count and bounding box."""

    ids: np.ndarray  # sorted local ids, no 0
    voxels: np.ndarray  # int64
    boxes: np.ndarray  # int64 (n, 6): z0, y0, x0, z1, y1, x1, volume frame, end exclusive


def owned_statistics(owned: np.ndarray, z_offset: int) -> OwnedStatistics:
    """Statistics of the labels in ``owned`` (uint (z, y, x)), whose first slice is volume slice ``z_offset``."""
    # Objects fill a few per cent of a block: work on the labelled voxels' flat
    # indices. A stable sort of integers is a radix sort, which groups them by id.
    voxels = np.flatnonzero(owned)
    if len(voxels) == 0:
        return OwnedStatistics(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 6), np.int64))
    ids = owned.reshape(-1)[voxels]
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    starts = np.flatnonzero(np.concatenate([[True], ids[1:] != ids[:-1]]))
    coordinates = np.unravel_index(voxels[order], owned.shape)
    del voxels, order
    lows = np.stack([np.minimum.reduceat(c, starts) for c in coordinates], axis=1)
    highs = np.stack([np.maximum.reduceat(c, starts) for c in coordinates], axis=1) + 1
    boxes = np.concatenate([lows, highs], axis=1).astype(np.int64)
    boxes[:, [0, 3]] += z_offset
    voxel_counts = np.diff(np.append(starts, len(ids))).astype(np.int64)
    return OwnedStatistics(ids[starts].astype(np.int64), voxel_counts, boxes)


class StaleScores(EmmitoError):
    """Block ``block``'s score rows do not count the voxels of its labels (a file changed after segment wrote it)."""

    def __init__(self, block: int, where: str | None = None) -> None:
        self.block = block
        super().__init__(
            f"{where or f'block {block}'}: its object scores ({contract.SLICE_SCORES}) do not count the voxels of "
            "its labels: rerun emmito segment for it"
        )


def traced_scores(
    read_scores: ScoreReader, layout: Layout, id_maps: list[dict[int, int]], owned_stats: list[OwnedStatistics], n_objects: int
) -> np.ndarray | None:
    """The object-score table of the traced volume (``contract.OBJECT_SCORE_COLUMNS``: id, voxels, heat_sum), or None.

    Block b's rows of the slices it owns are summed per global id: a global
    object's voxels and heat sum are those of exactly its traced voxels, so its
    mean (heat_sum / voxels) is the voxel-weighted mean of the block-local
    objects joined into it. None where some block has no rows (a block from
    elsewhere: a partial table would rank objects unevenly). Reads one block's
    rows at a time; raises ``StaleScores`` where a block's rows do not count its labels.
    """
    voxels = np.zeros(n_objects + 1, dtype=np.int64)
    heat_sums = np.zeros(n_objects + 1, dtype=np.int64)
    for b, stats in enumerate(owned_stats):
        rows = read_scores(b)
        if rows is None:
            print(f"emmito trace: block {b} has no object scores: the traced objects get none", file=sys.stderr)
            return None
        own_start, own_stop = layout.block_own_range(b)
        rows = rows[(rows[:, 1] >= 0) & (rows[:, 1] < own_stop - own_start)]
        where = np.searchsorted(stats.ids, rows[:, 0])
        known = where < len(stats.ids)
        known[known] = stats.ids[where[known]] == rows[known, 0]
        counted = np.zeros(len(stats.ids), dtype=np.int64)
        np.add.at(counted, where[known], rows[known, 2])
        if not known.all() or not np.array_equal(counted, stats.voxels):
            raise StaleScores(b)
        lut = np.zeros(int(stats.ids[-1]) + 1 if len(stats.ids) else 1, dtype=np.int64)
        if len(stats.ids):
            lut[stats.ids] = [id_maps[b][i] for i in stats.ids.tolist()]
        np.add.at(voxels, lut[rows[:, 0]], rows[:, 2])
        np.add.at(heat_sums, lut[rows[:, 0]], rows[:, 3])
    ids = np.arange(1, n_objects + 1, dtype=np.int64)
    return np.stack([ids, voxels[1:], heat_sums[1:]], axis=1)


def shared_slab(layout: Layout, b: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Block-local slice ranges of the slab that blocks b and b+1 both see: (in b, in b+1).

    Without overlap, the last slice of b is compared with the first of b+1
    (adjacent slices, as the original pipeline did).
    """
    own_start, own_stop = layout.block_own_range(b)
    start, stop = layout.block_range(b)
    if stop > own_stop:
        return (own_stop - start, stop - start), (0, stop - own_stop)
    return (own_stop - start - 1, own_stop - start), (0, 1)


def trace(
    read_block: BlockReader,
    layout: Layout,
    criterion: str,
    threshold: float,
    write_slab: Callable[[int, np.ndarray], None],
    progress: bool = False,
    read_scores: ScoreReader | None = None,
    write_scores: Callable[[np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Trace all blocks: calls ``write_slab(z_start, global_ids)`` for each block's owned slices.

    ``layout`` (with the volume's depth) says where each block sits. With
    ``read_scores`` and ``write_scores``, the blocks' score rows become one row
    per global id (``traced_scores``), handed to ``write_scores``; nothing is
    written where a block has none.

    Returns the trace record (trace.json): {"blocks", "objects", "id_map",
    "matching", "matches"} (``match_record``).
    """
    block_ids: list[np.ndarray] = []
    owned_stats: list[OwnedStatistics] = []
    matches: list[list[tuple[int, int, float]]] = []
    previous_tail: np.ndarray | None = None
    for b in tqdm(range(layout.n_blocks), desc="trace: match", unit="block", file=sys.stderr, disable=not progress):
        start, stop = layout.block_range(b)
        own_start, own_stop = layout.block_own_range(b)
        labels = read_block(b, 0, stop - start)
        if previous_tail is not None:
            head_range = shared_slab(layout, b - 1)[1]
            matches.append(scored_matches(previous_tail, labels[head_range[0] : head_range[1]], criterion, threshold))
        if b + 1 < layout.n_blocks:
            tail_range = shared_slab(layout, b)[0]
            previous_tail = labels[tail_range[0] : tail_range[1]].copy()
        owned_stats.append(owned_statistics(labels[: own_stop - own_start], own_start))
        # Ids seen anywhere in the block: the owned ones and those of the overlap past them.
        overlap_ids = np.asarray(fastremap.unique(labels[own_stop - own_start :]), dtype=np.int64)
        block_ids.append(np.union1d(owned_stats[-1].ids, overlap_ids[overlap_ids != 0]))
        del labels

    id_maps = resolve_ids(block_ids, [s.ids for s in owned_stats], [[(x, y) for x, y, _ in pairs] for pairs in matches])
    n_objects = max((max(m.values()) for m in id_maps if m), default=0)
    scores = traced_scores(read_scores, layout, id_maps, owned_stats, n_objects) if read_scores else None
    if scores is not None and write_scores is not None:
        write_scores(scores)

    for b in tqdm(range(layout.n_blocks), desc="trace: write", unit="block", file=sys.stderr, disable=not progress):
        own_start, own_stop = layout.block_own_range(b)
        owned = np.ascontiguousarray(read_block(b, 0, own_stop - own_start), dtype=np.uint32)
        ids = owned_stats[b].ids
        lut = np.zeros(int(ids[-1]) + 1 if len(ids) else 1, dtype=np.uint32)
        if len(ids):
            lut[ids] = [id_maps[b][i] for i in ids.tolist()]
        write_slab(own_start, apply_lut(owned, lut))
        del owned

    id_map = {str(b): {str(k): int(v) for k, v in m.items()} for b, m in enumerate(id_maps)}
    return {
        "blocks": layout.n_blocks,
        "objects": object_record(owned_stats, id_maps, n_objects),
        "id_map": id_map,
        **match_record(matches, id_maps, criterion, threshold),
    }


def object_record(owned_stats: list[OwnedStatistics], id_maps: list[dict[int, int]], n_objects: int) -> dict[str, Any]:
    """trace.json's "objects": per global id, its voxels, bounding box (volume frame, end exclusive) and blocks."""
    voxels = np.zeros(n_objects + 1, dtype=np.int64)
    box_low = np.full((n_objects + 1, 3), np.iinfo(np.int64).max, dtype=np.int64)
    box_high = np.zeros((n_objects + 1, 3), dtype=np.int64)
    spans: list[set[int]] = [set() for _ in range(n_objects + 1)]
    for b, stats in enumerate(owned_stats):
        if len(stats.ids) == 0:
            continue
        globals_ = np.array([id_maps[b][i] for i in stats.ids.tolist()], dtype=np.int64)
        np.add.at(voxels, globals_, stats.voxels)
        np.minimum.at(box_low, globals_, stats.boxes[:, :3])
        np.maximum.at(box_high, globals_, stats.boxes[:, 3:])
        for g in globals_.tolist():
            spans[g].add(b)
    return {
        str(g): {
            "voxels": int(voxels[g]),
            "bbox": [int(v) for v in box_low[g]] + [int(v) for v in box_high[g]],
            "blocks": sorted(spans[g]),
        }
        for g in range(1, n_objects + 1)
    }


def match_record(
    matches: list[list[tuple[int, int, float]]], id_maps: list[dict[int, int]], criterion: str, threshold: float
) -> dict[str, Any]:
    """trace.json's "matching" ({"criterion", "threshold"}) and "matches": every cross-block match with its score.

    One entry per matched pair, in block order then by pair: {"block": b (the
    pair is blocks b and b+1), "id_a": local id in block b, "id_b": local id in
    block b+1, "object": the global id they became, "score": the IoU (or IoA)
    over the shared slab, >= threshold}. A match just above the threshold is
    where tracing was least sure (``emmito suggest`` lists them).
    """
    entries = [
        {"block": b, "id_a": int(a), "id_b": int(c), "object": int(id_maps[b + 1][c]), "score": float(score)}
        for b, pairs in enumerate(matches)
        for a, c, score in pairs
    ]
    return {"matching": {"criterion": criterion, "threshold": float(threshold)}, "matches": entries}


def trace_arrays(
    block_labels: list[np.ndarray], block_slices: int, block_overlap: int, criterion: str = "iou", threshold: float = 0.5
) -> tuple[np.ndarray, dict[str, Any]]:
    """In-memory ``trace`` for tests: uint32 block labels (z, y, x), each with its overlap -> (volume, record).

    The volume is uint32 (depth, y, x) global ids; the record is trace.json's content.
    """
    depth = (len(block_labels) - 1) * block_slices + block_labels[-1].shape[0]
    layout = Layout.of_blocks(block_slices, block_overlap, depth)
    for b, labels in enumerate(block_labels):
        start, stop = layout.block_range(b)
        if labels.shape[0] != stop - start:
            raise ValueError(f"block {b} has {labels.shape[0]} slices, expected {stop - start}")
    volume = np.zeros((depth, *block_labels[0].shape[1:]), dtype=np.uint32)

    def write_slab(z_start: int, slab: np.ndarray) -> None:
        volume[z_start : z_start + slab.shape[0]] = slab

    record = trace(lambda b, start, stop: block_labels[b][start:stop], layout, criterion, threshold, write_slab)
    return volume, record


def _block_header(path: Path) -> tuple[int, Path, dict[str, Any], tuple[int, ...]]:
    """(offset, path, attributes, shape) of one label block, checked to be a uint (z, y, x) block from segment."""
    with open_volume(path) as ds:
        attrs = volume_attrs(ds)
        if ds.ndim != 3 or ds.dtype.kind != "u" or ds.dtype.itemsize > 4:
            raise EmmitoError(f"{path}: {ds.dtype} {tuple(ds.shape)} is not a uint32 (z, y, x) label block: rerun emmito segment for it")
        if contract.volume_depth(attrs) is None:
            raise EmmitoError(f"{path}: no '{contract.VOLUME_DEPTH}' attribute: rerun emmito segment for it")
        return contract.offset(attrs), path, attrs, tuple(ds.shape)


def check_blocks(paths: list[Path], layout: Layout) -> tuple[list[Path], dict[str, Any], tuple[int, int]]:
    """Order the block files by offset and check they are all of one volume's blocks, cut as ``layout`` says.

    Returns the ordered paths, the first block's attributes and the (y, x) shape.
    """
    headers = sorted((_block_header(path) for path in paths), key=lambda h: h[0])
    depth = contract.volume_depth(headers[0][2])
    layout = layout.with_depth(depth)
    block_slices, block_overlap = layout.block_slices, layout.block_overlap
    by_index: dict[int, tuple] = {}
    for offset, path, attrs, shape in headers:
        if contract.volume_depth(attrs) != depth or shape[1:] != headers[0][3][1:]:
            raise EmmitoError(
                f"{path}: {contract.VOLUME_DEPTH} {attrs[contract.VOLUME_DEPTH]} and (y, x) {shape[1:]} differ from {headers[0][1]}'s "
                f"({depth}, {headers[0][3][1:]}): the blocks come from different volumes; rerun emmito segment"
            )
        if offset % block_slices:
            raise EmmitoError(
                f"{path}: offset {offset} is not a multiple of merge.block_slices ({block_slices}): "
                f"the blocks were made with another block size; rerun merge and segment, or fix merge.block_slices"
            )
        index = offset // block_slices
        start, stop = layout.block_range(index)
        if shape[0] != stop - start:
            raise EmmitoError(
                f"{path}: holds {shape[0]} slices, but block {index} with merge.block_overlap {block_overlap} "
                f"holds {stop - start}: rerun merge and segment with the current config"
            )
        if index in by_index:
            raise EmmitoError(f"{path} and {by_index[index][0]} are both block {index}: pass each block once")
        by_index[index] = (path, attrs)
    missing = [b for b in range(layout.n_blocks) if b not in by_index]
    if missing:
        raise EmmitoError(
            f"block(s) {', '.join(map(str, missing))} of {layout.n_blocks} missing (e.g. seg/block_{missing[0]}.h5): "
            f"pass all blocks of the volume, running emmito segment for the missing ones first"
        )
    ordered = [by_index[b][0] for b in range(layout.n_blocks)]
    return ordered, by_index[0][1], headers[0][3][1:]


def trace_files(
    out: Path,
    id_map_path: Path,
    block_paths: list[Path],
    layout: Layout,
    criterion: str,
    threshold: float,
    progress: bool = False,
) -> dict[str, Any]:
    """Trace seg/block_*.h5 into ``out`` (seg_infer.h5, uint32 (depth, y, x)) and ``id_map_path`` (trace.json).

    ``layout``: the block cutting (the volume's depth is taken from the blocks);
    ``criterion`` and ``threshold``: how overlap objects are matched (``match_overlap``).
    """
    ordered, attrs, shape_yx = check_blocks([Path(p) for p in block_paths], layout)
    layout = layout.with_depth(contract.volume_depth(attrs))

    def read_block(b: int, start: int, stop: int) -> np.ndarray:
        return read_volume(ordered[b], start, stop)[0]

    def read_scores(b: int) -> np.ndarray | None:
        with open_volume(ordered[b]) as block:
            return read_table(block, contract.SLICE_SCORES, contract.SLICE_SCORE_COLUMNS)

    kept = contract.frame_attrs(attrs)
    shape = (layout.depth, *shape_yx)
    with create_volume(out, shape, np.uint32, voxel_size=contract.voxel_size(attrs), offset=0, attrs=kept) as ds:

        def write_slab(z_start: int, slab: np.ndarray) -> None:
            ds[z_start : z_start + slab.shape[0]] = slab

        def write_scores(table: np.ndarray) -> None:
            write_table(ds, contract.OBJECT_SCORES, table, contract.OBJECT_SCORE_COLUMNS)

        try:
            record = trace(read_block, layout, criterion, threshold, write_slab, progress, read_scores, write_scores)
        except StaleScores as exc:
            raise StaleScores(exc.block, str(ordered[exc.block])) from None
    write_json(id_map_path, record)
    return record


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito trace OUT ID_MAP BLOCK...``."""
    merge, section = params["merge"], params["trace"]
    layout = Layout.of_blocks(merge["block_slices"], merge["block_overlap"])
    record = trace_files(
        args.out, args.id_map, list(args.blocks), layout, section["criterion"], section["threshold"], progress=True
    )
    print(f"emmito trace: {len(record['objects'])} objects across {record['blocks']} blocks", file=sys.stderr)
