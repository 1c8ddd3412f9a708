"""``emmito evaluate``: metrics.json of a segmentation against ground truth, read slab by slab.

The metrics themselves (voxel precision/recall/IoU/Dice, instance
precision/recall/F1 at a 3D IoU threshold, F1 at 0.50..0.95, the per-slice
``f1_2d``; AP at IoU 0.50 and 0.75, variation of information, adapted Rand
error, F1 per size tercile) are ``emmito.metrics``, which training's
validation shares; this stage reads the two files ``slab_slices`` slices at a
time into its accumulator and writes the result. AP ranks the objects by the
mean foreground probability that seg.h5 carries (``contract.OBJECT_SCORES``,
from segment through trace and upsample), or by size where it carries none
(metrics.json's ``ap_score`` says which).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from emmito import contract
from emmito.io import EmmitoError, open_volume, read_table, write_json
from emmito.metrics import AP_SCORE_PROBABILITY, MetricsAccumulator, object_scores, rounded


def evaluate_files(
    seg_path: Path, label_path: Path, iou_threshold: float, slab_slices: int, progress: bool = False
) -> dict[str, Any]:
    """Metrics of seg.h5's dataset against label.h5's, reading ``slab_slices`` slices at a time."""
    accumulator = MetricsAccumulator()
    with open_volume(seg_path) as seg, open_volume(label_path) as gt:
        if contract.VALID_MASK in gt.file:
            raise EmmitoError(
                f"{label_path} is labelled only in part (its '{contract.VALID_MASK}' mask): evaluate needs a fully labelled volume"
            )
        if seg.shape != gt.shape:
            raise EmmitoError(
                f"{seg_path} is {tuple(seg.shape)} but {label_path} is {tuple(gt.shape)}: compare the full-resolution "
                f"seg.h5 with the label.h5 of the same volume (rerun upsample if seg.h5 is stale)"
            )
        if seg.ndim != 3:
            raise EmmitoError(f"{seg_path}: shape {tuple(seg.shape)} is not a (z, y, x) volume: pass seg.h5 and label.h5")
        scores = object_scores(read_table(seg, contract.OBJECT_SCORES, contract.OBJECT_SCORE_COLUMNS))
        depth = seg.shape[0]
        for z_start in tqdm(range(0, depth, slab_slices), desc="evaluate", unit="slab", file=sys.stderr, disable=not progress):
            z_stop = min(z_start + slab_slices, depth)
            accumulator.add(seg[z_start:z_stop], gt[z_start:z_stop])
    metrics = accumulator.result(iou_threshold, scores)
    if metrics["ap_score"] != AP_SCORE_PROBABILITY:
        why = "has no object scores" if scores is None else "has no score for some of its objects"
        print(f"emmito evaluate: {seg_path} {why}: AP ranks the objects by size", file=sys.stderr)
    return metrics


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics`` (rounded) to ``out`` and say the headline figures on stderr."""
    write_json(out, rounded(metrics))
    print(
        f"emmito evaluate: voxel IoU {metrics['voxel_iou']:.3f}, instance F1 {metrics['instance_f1']:.3f} "
        f"({metrics['matched_objects']}/{metrics['gt_objects']} objects matched at IoU {metrics['iou_threshold']}), "
        f"AP50 {metrics['ap50']:.3f}, AP75 {metrics['ap75']:.3f} (ranked by {metrics['ap_score']})",
        file=sys.stderr,
    )


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito evaluate SEG LABEL OUT``: writes metrics.json."""
    section = params["evaluate"]
    metrics = evaluate_files(args.seg, args.label, section["iou_threshold"], section["slab_slices"], progress=True)
    write_metrics(args.out, metrics)
