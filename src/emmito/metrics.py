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

The field's metrics, from the same table (so equally bounded in memory):
``ap50`` / ``ap75``, average precision at IoU 0.50 / 0.75 as MitoEM computes it
(``average_precision``: predictions ranked by their mean foreground
probability, or by size where the segmentation carries no scores, as
``ap_score`` says); ``voi_split`` / ``voi_merge`` / ``arand``, variation of
information and adapted Rand error with scikit-image's conventions
(``information_metrics``); ``f1_small`` / ``f1_medium`` / ``f1_large``,
instance F1 at ``iou_threshold`` per ground-truth size tercile
(``size_terciles``).

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

from emmito import contract

F1_IOU_THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]
SLICE_IOU_THRESHOLD = 0.5
DIGITS = 6
# AP (the MitoEM protocol): at these IoU thresholds (keys ap50, ap75), COCO's 101 recall levels.
AP_IOU_THRESHOLDS = (0.5, 0.75)
AP_RECALL_LEVELS = np.arange(101) / 100
# What ranked the predictions for AP (metrics.json's ap_score).
AP_SCORE_PROBABILITY = "mean_probability"
AP_SCORE_SIZE = "voxel_count"
SIZE_TERCILES = ("small", "medium", "large")


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


def match_pairs(
    pair_gt: np.ndarray, pair_pred: np.ndarray, iou: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """(gt ids, predicted ids) of a one-to-one matching of the objects whose pairs reach ``threshold`` IoU.

    Above 0.5 every candidate pair is already one-to-one (two objects that
    each overlap more than half of the union with a third cannot be disjoint),
    so the matching is all candidates. At or below 0.5 each connected group of
    candidates gets a linear assignment that maximises the number of matches,
    then their total IoU.
    """
    candidate = iou >= threshold
    if threshold > 0.5 or not candidate.any():
        return pair_gt[candidate], pair_pred[candidate]
    gt_index, gt_nodes = np.unique(pair_gt[candidate], return_inverse=True)
    pred_index, pred_nodes = np.unique(pair_pred[candidate], return_inverse=True)
    weights = iou[candidate]
    n_gt, n_pred = len(gt_index), len(pred_index)
    graph = sparse.coo_matrix(
        (np.ones(len(weights), np.int8), (gt_nodes, n_gt + pred_nodes)), shape=(n_gt + n_pred, n_gt + n_pred)
    )
    _, group_of_node = csgraph.connected_components(graph, directed=False)
    group_of_pair = group_of_node[gt_nodes]
    chosen: list[np.ndarray] = [np.flatnonzero(np.bincount(group_of_pair)[group_of_pair] == 1)]
    for group in np.flatnonzero(np.bincount(group_of_pair) > 1):
        in_group = np.flatnonzero(group_of_pair == group)
        rows, row_of = np.unique(gt_nodes[in_group], return_inverse=True)
        cols, col_of = np.unique(pred_nodes[in_group], return_inverse=True)
        # Each match is worth more than every IoU of the group together, so the
        # assignment first maximises the number of matches.
        gain = np.zeros((len(rows), len(cols)))
        gain[row_of, col_of] = len(in_group) + 1 + weights[in_group]
        pair_at = np.full((len(rows), len(cols)), -1, dtype=np.int64)
        pair_at[row_of, col_of] = in_group
        chosen_rows, chosen_cols = linear_sum_assignment(gain, maximize=True)
        kept = gain[chosen_rows, chosen_cols] > 0
        chosen.append(pair_at[chosen_rows[kept], chosen_cols[kept]])
    pairs = np.sort(np.concatenate(chosen))
    return gt_index[gt_nodes[pairs]], pred_index[pred_nodes[pairs]]


def count_matches(pair_gt: np.ndarray, pair_pred: np.ndarray, iou: np.ndarray, threshold: float) -> int:
    """Size of the one-to-one matching of ``match_pairs``."""
    return len(match_pairs(pair_gt, pair_pred, iou, threshold)[0])


def greedy_matched(
    pair_gt: np.ndarray, pair_pred: np.ndarray, iou: np.ndarray, threshold: float, pred_ids: np.ndarray, rank: np.ndarray
) -> np.ndarray:
    """Which predictions (bool, aligned with ``pred_ids``) a COCO-style greedy matching makes true positives.

    Predictions in ``rank`` order (0 first: the highest score) each take, of
    the gt objects not yet taken whose IoU with it reaches ``threshold``, the
    one of highest IoU (ties to the lower gt id), as COCO's and MitoEM's
    evaluations do. Above IoU 0.5 candidates are one-to-one and the greedy
    matching is every candidate; at 0.5 exactly one object can reach two.
    """
    candidate = iou >= threshold
    gt, pred, value = pair_gt[candidate], pair_pred[candidate], iou[candidate]
    where = np.searchsorted(pred_ids, pred)
    matched = np.zeros(len(pred_ids), dtype=bool)
    if len(np.unique(gt)) == len(gt) and len(np.unique(pred)) == len(pred):
        matched[where] = True
        return matched
    taken: set[int] = set()
    for i in np.lexsort((gt, -value, rank[where])).tolist():
        if matched[where[i]] or int(gt[i]) in taken:
            continue
        matched[where[i]] = True
        taken.add(int(gt[i]))
    return matched


def average_precision(
    pair_gt: np.ndarray, pair_pred: np.ndarray, iou: np.ndarray, threshold: float,
    pred_ids: np.ndarray, scores: np.ndarray, n_gt: int,
) -> float:
    """Average precision at one IoU threshold, the MitoEM protocol (COCO's, in 3D).

    Predictions are ranked by ``scores`` (aligned with ``pred_ids``; highest
    first, ties to the lower id) and matched greedily (``greedy_matched``);
    precision and recall after each rank make the PR curve, whose precision is
    made non-increasing (each point takes the best precision at any higher
    recall). AP is COCO's 101-point interpolation: the mean, over recall
    levels 0, 0.01, ..., 1, of that precision at the first rank reaching the
    level (0 where no rank does). No ground truth: 1.0 without predictions,
    else 0.0; no predictions against some ground truth: 0.0.
    """
    if n_gt == 0 or len(pred_ids) == 0:
        return _ratio(0, n_gt + len(pred_ids), n_gt == len(pred_ids) == 0)
    order = np.lexsort((pred_ids, -np.asarray(scores, dtype=np.float64)))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    true = greedy_matched(pair_gt, pair_pred, iou, threshold, pred_ids, rank)[order]
    found = np.cumsum(true)
    recall = found / n_gt
    precision = found / np.arange(1, len(true) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    at = np.searchsorted(recall, AP_RECALL_LEVELS, side="left")
    return float(np.where(at < len(precision), precision[np.minimum(at, len(precision) - 1)], 0.0).mean())


def _table_cells(
    pair_gt: np.ndarray, pair_pred: np.ndarray, intersections: np.ndarray,
    gt_ids: np.ndarray, gt_sizes: np.ndarray, pred_ids: np.ndarray, pred_sizes: np.ndarray, voxels: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The whole contingency table, background (0) included, from its both-foreground pairs and the sizes.

    Returns per non-empty cell its gt id, predicted id, voxel count, and the
    cell counts as float64: the pairs, then (gt, 0) for each gt object's voxels
    outside every prediction, (0, pred) likewise, and (0, 0).
    """
    gt_at = np.searchsorted(gt_ids, pair_gt)
    pred_at = np.searchsorted(pred_ids, pair_pred)
    gt_outside = gt_sizes - np.bincount(gt_at, weights=intersections, minlength=len(gt_ids)).astype(np.int64)
    pred_outside = pred_sizes - np.bincount(pred_at, weights=intersections, minlength=len(pred_ids)).astype(np.int64)
    both_background = voxels - int(gt_sizes.sum()) - int(pred_outside.sum())
    zero_gt, zero_pred = np.zeros(len(pred_ids), np.uint64), np.zeros(len(gt_ids), np.uint64)
    cell_gt = np.concatenate([pair_gt, gt_ids, zero_gt, [0]]).astype(np.uint64)
    cell_pred = np.concatenate([pair_pred, zero_pred, pred_ids, [0]]).astype(np.uint64)
    counts = np.concatenate([intersections, gt_outside, pred_outside, [both_background]]).astype(np.int64)
    keep = counts > 0
    return cell_gt[keep], cell_pred[keep], counts[keep], counts[keep].astype(np.float64)


def information_metrics(
    pair_keys: np.ndarray, intersections: np.ndarray,
    gt_ids: np.ndarray, gt_sizes: np.ndarray, pred_ids: np.ndarray, pred_sizes: np.ndarray, voxels: int,
) -> dict[str, float]:
    """Variation of information (split, merge) and adapted Rand error, from the accumulated contingency table.

    The same quantities as scikit-image's, which need both whole arrays:
    ``voi_split`` = H(seg | gt) and ``voi_merge`` = H(gt | seg) in bits, the
    two values of ``skimage.metrics.variation_of_information(gt, seg)`` (its
    "false splits, false merges"): over every voxel, background (0) a label
    like any other (skimage's default ``ignore_labels=()``); 0 for an empty
    volume. ``arand``: ``skimage.metrics.adapted_rand_error(gt, seg)[0]`` (the
    SNEMI3D score, alpha 0.5) over the voxels of gt objects only (skimage's
    default ``ignore_labels=(0,)`` on the gt; predicted background there is one
    more predicted label). Where skimage divides 0 by 0 (no gt object of two
    voxels or more, no pair) it is 0.0 when prediction and ground truth are
    both empty, else 1.0.
    """
    cell_gt, cell_pred, counts, weight = _table_cells(
        pair_keys >> np.uint64(32), pair_keys & np.uint64(0xFFFFFFFF), intersections,
        gt_ids, gt_sizes, pred_ids, pred_sizes, voxels,
    )
    # marginal of each cell's row (gt) and column (prediction), background included
    gt_all = np.concatenate([[0], gt_ids]).astype(np.uint64)
    gt_total = np.concatenate([[voxels - int(gt_sizes.sum())], gt_sizes]).astype(np.float64)
    pred_all = np.concatenate([[0], pred_ids]).astype(np.uint64)
    pred_total = np.concatenate([[voxels - int(pred_sizes.sum())], pred_sizes]).astype(np.float64)
    row = gt_total[np.searchsorted(gt_all, cell_gt)]
    column = pred_total[np.searchsorted(pred_all, cell_pred)]
    p = weight / voxels if voxels else weight
    voi_split = float(-(p * np.log2(weight / row)).sum())
    voi_merge = float(-(p * np.log2(weight / column)).sum())
    # adapted Rand: the cells of gt objects; columns summed over those rows only
    inside = cell_gt != 0
    n = weight[inside]
    _, column_of = np.unique(cell_pred[inside], return_inverse=True)
    b = np.bincount(column_of.reshape(-1), weights=n) if len(n) else np.zeros(0)
    a = gt_sizes.astype(np.float64)
    same = float(n @ n - n.sum())
    denominator = 0.5 * float(a @ a - a.sum()) + 0.5 * float(b @ b - b.sum())
    both_empty = len(gt_ids) == 0 and len(pred_ids) == 0
    return {
        "voi_split": max(voi_split, 0.0),
        "voi_merge": max(voi_merge, 0.0),
        "arand": 1.0 - _ratio(same, denominator, both_empty),
    }


def size_terciles(
    gt_ids: np.ndarray, gt_sizes: np.ndarray, pred_ids: np.ndarray, pred_sizes: np.ndarray,
    matched_gt: np.ndarray, matched_pred: np.ndarray,
) -> dict[str, Any]:
    """Instance F1 per ground-truth size tercile (small, medium, large), of a one-to-one matching.

    The gt sizes in ascending order s_0..s_{n-1} give the bounds b1 = s_{n//3}
    and b2 = s_{2n//3} (``size_tercile_bounds``, voxels): small is a size
    below b1, medium from b1 to below b2, large b2 and above, so each holds
    about a third of the gt objects (equal sizes share a tercile). A matched
    prediction counts in its gt object's tercile; an unmatched one in the
    tercile its own size falls in. F1 per tercile as ``instance_f1`` (1.0
    where a tercile holds neither gt nor predicted objects). Without ground
    truth the bounds and F1s are None.
    """
    if len(gt_ids) == 0:
        return {
            "size_tercile_bounds": None, **{f"f1_{name}": None for name in SIZE_TERCILES},
            "gt_objects_by_size": None, "predicted_objects_by_size": None, "matched_objects_by_size": None,
        }
    ordered = np.sort(gt_sizes)
    bounds = np.array([ordered[len(ordered) // 3], ordered[2 * len(ordered) // 3]], dtype=np.int64)
    gt_tercile = np.searchsorted(bounds, gt_sizes, side="right")
    pred_tercile = np.searchsorted(bounds, pred_sizes, side="right")
    matched_tercile = gt_tercile[np.searchsorted(gt_ids, matched_gt)]
    pred_tercile[np.searchsorted(pred_ids, matched_pred)] = matched_tercile
    gt_counts = np.bincount(gt_tercile, minlength=3)
    pred_counts = np.bincount(pred_tercile, minlength=3)
    matched_counts = np.bincount(matched_tercile, minlength=3)
    f1 = {
        f"f1_{name}": _ratio(2 * int(matched_counts[t]), int(gt_counts[t] + pred_counts[t]), gt_counts[t] + pred_counts[t] == 0)
        for t, name in enumerate(SIZE_TERCILES)
    }
    return {
        "size_tercile_bounds": bounds.tolist(), **f1,
        "gt_objects_by_size": gt_counts.tolist(),
        "predicted_objects_by_size": pred_counts.tolist(),
        "matched_objects_by_size": matched_counts.tolist(),
    }


def object_scores(table: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids uint64 ascending, mean foreground probability float64) of a ``contract.OBJECT_SCORES`` table, or None."""
    if table is None:
        return None
    table = table[np.argsort(table[:, 0], kind="stable")]
    voxels = np.maximum(table[:, 1], 1).astype(np.float64)
    return table[:, 0].astype(np.uint64), table[:, 2] / (contract.HEAT_MAX * voxels)


def ranking_scores(
    pred_ids: np.ndarray, pred_sizes: np.ndarray, scores: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, str]:
    """The score that ranks each prediction for AP, and its kind (``AP_SCORE_*``).

    Each object's mean foreground probability where ``scores`` (``object_scores``)
    holds every predicted id; else (no scores, e.g. a segmentation made
    elsewhere, or some ids missing) its size in voxels, larger first.
    """
    if scores is not None:
        ids, values = scores
        where = np.searchsorted(ids, pred_ids)
        found = where < len(ids)
        found[found] = ids[where[found]] == pred_ids[found]
        if found.all():
            return np.asarray(values, dtype=np.float64)[where], AP_SCORE_PROBABILITY
    return pred_sizes.astype(np.float64), AP_SCORE_SIZE


class MetricsAccumulator:
    """Adds up voxel counts and contingency tables over slabs; ``result`` gives the metrics."""

    def __init__(self) -> None:
        self.voxels = 0
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
        self.voxels += int(seg.size)
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

    def result(self, iou_threshold: float = 0.5, scores: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
        """The metrics as a flat dict (see metrics.json).

        ``scores``: each predicted object's mean foreground probability
        (``object_scores``), which ranks them for AP; without it, size does.
        """
        tp, fp, fn = self.true_positive, self.false_positive, self.false_negative
        voxels_empty = tp + fp + fn == 0
        gt_ids, gt_sizes = self.gt_sizes
        pred_ids, pred_sizes = self.pred_sizes
        n_gt, n_pred = len(gt_ids), len(pred_ids)
        objects_empty = n_gt == 0 and n_pred == 0
        pair_gt, pair_pred, iou = pair_ious(*self.pairs, gt_ids, gt_sizes, pred_ids, pred_sizes)

        def f1(matched: int) -> float:
            return _ratio(2 * matched, n_gt + n_pred, objects_empty)

        matched_gt, matched_pred = match_pairs(pair_gt, pair_pred, iou, iou_threshold)
        matched = len(matched_gt)
        ranking, ranked_by = ranking_scores(pred_ids, pred_sizes, scores)
        ap = {
            f"ap{round(100 * t)}": average_precision(pair_gt, pair_pred, iou, t, pred_ids, ranking, n_gt)
            for t in AP_IOU_THRESHOLDS
        }
        field = {
            **ap, "ap_score": ranked_by,
            **information_metrics(*self.pairs, gt_ids, gt_sizes, pred_ids, pred_sizes, self.voxels),
            **size_terciles(gt_ids, gt_sizes, pred_ids, pred_sizes, matched_gt, matched_pred),
        }
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
            **field,
        }


def evaluate_arrays(
    seg: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5, scores: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, Any]:
    """Metrics of ``seg`` against ``gt``: integer (z, y, x) instance ids (uint32), 0 = background.

    ``scores``: (ids, mean foreground probability) of ``seg``'s objects for
    AP (``object_scores``); None ranks them by size. Returns a flat dict of
    floats, counts and the F1-vs-IoU lists (see the module doc).
    """
    accumulator = MetricsAccumulator()
    accumulator.add(seg, gt)
    return accumulator.result(iou_threshold, scores)


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
