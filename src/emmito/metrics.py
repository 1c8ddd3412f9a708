"""Voxel and instance metrics of a segmentation against ground truth: the arrays, slab by slab.

Shared by ``evaluate`` (metrics.json of whole volumes, read slab by slab) and
training's validation (voxel IoU and instance F1 of in-memory volumes).

Voxel metrics (foreground vs background): precision, recall, IoU (Jaccard),
Dice. Instance metrics: every (gt id, predicted id) pair's intersection is
counted in a contingency table, which adds up over slabs, so the whole volume
is never in memory; pairs' 3D IoUs then give a one-to-one matching and
precision, recall and F1 at ``iou_threshold`` (and F1 at 0.50..0.95 for
plots). ``f1_2d`` matches the 2D connected components of each slice at IoU 0.5
and sums over slices, the per-slice score 2D tools report.

A ratio whose denominator is 0 is 1.0 when prediction and ground truth are
both empty (nothing to find and nothing found: perfect agreement), else 0.0
(e.g. precision of an empty prediction against a non-empty ground truth).
"""

from __future__ import annotations

from typing import Any

import cc3d
import fastremap
import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csgraph

F1_IOU_THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]
SLICE_IOU_THRESHOLD = 0.5
DIGITS = 6


def _ratio(numerator: float, denominator: float, both_empty: bool) -> float:
    if denominator == 0:
        return 1.0 if both_empty else 0.0
    return numerator / denominator


def _add_counts(
    keys: np.ndarray, counts: np.ndarray, new_keys: np.ndarray, new_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sum two sparse count tables (sorted unique uint64 keys, int64 counts)."""
    if len(keys) == 0:
        return new_keys, new_counts
    all_keys, where = np.unique(np.concatenate([keys, new_keys]), return_inverse=True)
    summed = np.zeros(len(all_keys), dtype=np.int64)
    np.add.at(summed, where, np.concatenate([counts, new_counts]))
    return all_keys, summed


def _label_counts(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted non-zero labels of ``labels`` and their voxel counts, as uint64 / int64."""
    ids, counts = fastremap.unique(labels, return_counts=True)
    ids = np.asarray(ids, dtype=np.uint64)
    counts = np.asarray(counts, dtype=np.int64)
    nonzero = ids != 0
    return ids[nonzero], counts[nonzero]


def _pair_counts(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contingency table of two label arrays: packed keys gt << 32 | pred and intersection counts."""
    gt = gt.reshape(-1)
    pred = pred.reshape(-1)
    both = (gt != 0) & (pred != 0)
    keys = (gt[both].astype(np.uint64) << np.uint64(32)) | pred[both].astype(np.uint64)
    pair_keys, counts = fastremap.unique(keys, return_counts=True)
    return np.asarray(pair_keys, dtype=np.uint64), np.asarray(counts, dtype=np.int64)


def pair_ious(
    pair_keys: np.ndarray, intersections: np.ndarray,
    gt_ids: np.ndarray, gt_sizes: np.ndarray, pred_ids: np.ndarray, pred_sizes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gt id, predicted id, IoU) of every overlapping pair, from the contingency table and sizes."""
    pair_gt = pair_keys >> np.uint64(32)
    pair_pred = pair_keys & np.uint64(0xFFFFFFFF)
    size_gt = gt_sizes[np.searchsorted(gt_ids, pair_gt)]
    size_pred = pred_sizes[np.searchsorted(pred_ids, pair_pred)]
    iou = intersections / (size_gt + size_pred - intersections).astype(np.float64)
    return pair_gt, pair_pred, iou


def count_matches(pair_gt: np.ndarray, pair_pred: np.ndarray, iou: np.ndarray, threshold: float) -> int:
    """Size of a one-to-one matching of gt and predicted objects whose pairs reach ``threshold`` IoU.

    Above 0.5 every candidate pair is already one-to-one (two objects that
    each overlap more than half of the union with a third cannot be disjoint),
    so the matching is all candidates. At or below 0.5 each connected group of
    candidates gets a linear assignment that maximises the number of matches,
    then their total IoU.
    """
    candidate = iou >= threshold
    if threshold > 0.5 or not candidate.any():
        return int(candidate.sum())
    gt_index, gt_nodes = np.unique(pair_gt[candidate], return_inverse=True)
    pred_index, pred_nodes = np.unique(pair_pred[candidate], return_inverse=True)
    weights = iou[candidate]
    n_gt, n_pred = len(gt_index), len(pred_index)
    graph = sparse.coo_matrix(
        (np.ones(len(weights), np.int8), (gt_nodes, n_gt + pred_nodes)), shape=(n_gt + n_pred, n_gt + n_pred)
    )
    _, group_of_node = csgraph.connected_components(graph, directed=False)
    group_of_pair = group_of_node[gt_nodes]
    matched = 0
    for group in np.unique(group_of_pair):
        in_group = np.flatnonzero(group_of_pair == group)
        if len(in_group) == 1:
            matched += 1
            continue
        rows, row_of = np.unique(gt_nodes[in_group], return_inverse=True)
        cols, col_of = np.unique(pred_nodes[in_group], return_inverse=True)
        # Each match is worth more than every IoU of the group together, so the
        # assignment first maximises the number of matches.
        gain = np.zeros((len(rows), len(cols)))
        gain[row_of, col_of] = len(in_group) + 1 + weights[in_group]
        chosen_rows, chosen_cols = linear_sum_assignment(gain, maximize=True)
        matched += int((gain[chosen_rows, chosen_cols] > 0).sum())
    return matched


class MetricsAccumulator:
    """Adds up voxel counts and contingency tables over slabs; ``result`` gives the metrics."""

    def __init__(self) -> None:
        self.true_positive = 0
        self.false_positive = 0
        self.false_negative = 0
        empty_keys, empty_counts = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        self.pairs = (empty_keys, empty_counts)
        self.gt_sizes = (empty_keys, empty_counts)
        self.pred_sizes = (empty_keys, empty_counts)
        self.gt_objects_2d = 0
        self.pred_objects_2d = 0
        self.matched_2d = 0

    def add(self, seg: np.ndarray, gt: np.ndarray) -> None:
        """Count one slab: ``seg`` and ``gt`` are integer (z, y, x) ids of the same slices, 0 = background."""
        if seg.shape != gt.shape:
            raise ValueError(f"prediction {seg.shape} and ground truth {gt.shape} differ in shape")
        seg_foreground = seg != 0
        gt_foreground = gt != 0
        true_positive = int(np.count_nonzero(seg_foreground & gt_foreground))
        self.true_positive += true_positive
        self.false_positive += int(np.count_nonzero(seg_foreground)) - true_positive
        self.false_negative += int(np.count_nonzero(gt_foreground)) - true_positive
        del seg_foreground, gt_foreground
        self.pairs = _add_counts(*self.pairs, *_pair_counts(gt, seg))
        self.gt_sizes = _add_counts(*self.gt_sizes, *_label_counts(gt))
        self.pred_sizes = _add_counts(*self.pred_sizes, *_label_counts(seg))
        for z in range(seg.shape[0]):
            self._add_slice(seg[z], gt[z])

    def _add_slice(self, seg: np.ndarray, gt: np.ndarray) -> None:
        # 8-connected components of each id: a 3D object seen twice in a slice is two 2D objects.
        gt_2d = cc3d.connected_components(gt, connectivity=8)
        seg_2d = cc3d.connected_components(seg, connectivity=8)
        gt_ids, gt_sizes = _label_counts(gt_2d)
        seg_ids, seg_sizes = _label_counts(seg_2d)
        self.gt_objects_2d += len(gt_ids)
        self.pred_objects_2d += len(seg_ids)
        if len(gt_ids) and len(seg_ids):
            pair_gt, pair_pred, iou = pair_ious(*_pair_counts(gt_2d, seg_2d), gt_ids, gt_sizes, seg_ids, seg_sizes)
            self.matched_2d += count_matches(pair_gt, pair_pred, iou, SLICE_IOU_THRESHOLD)

    def result(self, iou_threshold: float = 0.5) -> dict[str, Any]:
        """The metrics as a flat dict (see metrics.json)."""
        tp, fp, fn = self.true_positive, self.false_positive, self.false_negative
        voxels_empty = tp + fp + fn == 0
        gt_ids, gt_sizes = self.gt_sizes
        pred_ids, pred_sizes = self.pred_sizes
        n_gt, n_pred = len(gt_ids), len(pred_ids)
        objects_empty = n_gt == 0 and n_pred == 0
        pair_gt, pair_pred, iou = pair_ious(*self.pairs, gt_ids, gt_sizes, pred_ids, pred_sizes)

        def f1(matched: int) -> float:
            return _ratio(2 * matched, n_gt + n_pred, objects_empty)

        matched = count_matches(pair_gt, pair_pred, iou, iou_threshold)
        slices_empty = self.gt_objects_2d == 0 and self.pred_objects_2d == 0
        return {
            "voxel_precision": _ratio(tp, tp + fp, voxels_empty),
            "voxel_recall": _ratio(tp, tp + fn, voxels_empty),
            "voxel_iou": _ratio(tp, tp + fp + fn, voxels_empty),
            "voxel_dice": _ratio(2 * tp, 2 * tp + fp + fn, voxels_empty),
            "voxel_true_positive": tp,
            "voxel_false_positive": fp,
            "voxel_false_negative": fn,
            "iou_threshold": float(iou_threshold),
            "gt_objects": n_gt,
            "predicted_objects": n_pred,
            "matched_objects": matched,
            "instance_precision": _ratio(matched, n_pred, objects_empty),
            "instance_recall": _ratio(matched, n_gt, objects_empty),
            "instance_f1": f1(matched),
            "f1_iou_thresholds": list(F1_IOU_THRESHOLDS),
            "f1_at_iou": [f1(count_matches(pair_gt, pair_pred, iou, t)) for t in F1_IOU_THRESHOLDS],
            "f1_2d": _ratio(2 * self.matched_2d, self.gt_objects_2d + self.pred_objects_2d, slices_empty),
            "gt_objects_2d": self.gt_objects_2d,
            "predicted_objects_2d": self.pred_objects_2d,
            "matched_objects_2d": self.matched_2d,
        }


def evaluate_arrays(seg: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> dict[str, Any]:
    """Metrics of ``seg`` against ``gt``: integer (z, y, x) instance ids (uint32), 0 = background.

    Returns a flat dict of floats, counts and the F1-vs-IoU lists (see the module doc).
    """
    accumulator = MetricsAccumulator()
    accumulator.add(seg, gt)
    return accumulator.result(iou_threshold)


def instance_f1(seg: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> float:
    """Instance F1 of ``seg`` against ``gt`` (integer (z, y, x) ids, 0 = background) at one 3D IoU threshold.

    One-to-one matching as in ``evaluate_arrays``, without the voxel and 2D
    metrics (so it is cheap enough to compare two segmentations of a block).
    """
    if seg.shape != gt.shape:
        raise ValueError(f"segmentations differ in shape: {seg.shape} vs {gt.shape}")
    gt_ids, gt_sizes = _label_counts(gt)
    seg_ids, seg_sizes = _label_counts(seg)
    if len(gt_ids) == 0 or len(seg_ids) == 0:
        return _ratio(0, len(gt_ids) + len(seg_ids), len(gt_ids) == len(seg_ids) == 0)
    pair_gt, pair_seg, iou = pair_ious(*_pair_counts(gt, seg), gt_ids, gt_sizes, seg_ids, seg_sizes)
    matched = count_matches(pair_gt, pair_seg, iou, iou_threshold)
    return _ratio(2 * matched, len(gt_ids) + len(seg_ids), False)


def rounded(value: Any, digits: int = DIGITS) -> Any:
    """``value`` with every float rounded to ``digits`` digits (lists and dicts walked)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def voxel_iou(probability: np.ndarray, label: np.ndarray, threshold: float = 0.5) -> tuple[int, int]:
    """(intersection, union) voxel counts of ``probability > threshold`` against ``label > 0``."""
    predicted, truth = probability > threshold, label != 0
    return int(np.count_nonzero(predicted & truth)), int(np.count_nonzero(predicted | truth))
