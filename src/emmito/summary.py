"""``emmito summary CONFIG``: one screen on what a finished run produced and where it is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from emmito import config as cfg
from emmito import contract
from emmito.labels import read_objects

METRIC_ROWS = (
    ("instance F1@IoU", "instance_f1", "iou_threshold"),
    ("instance precision", "instance_precision", None),
    ("instance recall", "instance_recall", None),
    ("2D instance F1 (per slice)", "f1_2d", None),
    ("voxel IoU (foreground)", "voxel_iou", None),
    ("voxel precision", "voxel_precision", None),
    ("voxel recall", "voxel_recall", None),
    ("AP@IoU 0.50", "ap50", None),
    ("AP@IoU 0.75", "ap75", None),
    ("VOI split (bits)", "voi_split", None),
    ("VOI merge (bits)", "voi_merge", None),
    ("adapted Rand error", "arand", None),
)


def summarize(config: dict[str, Any], results: Path = Path(contract.RESULTS)) -> str:
    """A short text report of every segmented volume: objects, metrics and output paths.

    ``results``: the results root of the run (``contract.Results``' root).
    """
    layout = contract.Results(str(results))
    model = config["model"]["name"]
    lines = []
    lines.append(f"model      {Path(layout.checkpoint(model))}  (training log: {Path(layout.training_log(model))})")
    for vol in config["infer"]["volumes"]:
        lines.append("")
        lines.append(f"volume '{vol}'")
        id_map = Path(layout.id_map(vol))
        if id_map.exists():
            objects = json.loads(id_map.read_text()).get("objects", {})
            lines.append(f"  objects found        {len(objects)}")
        metrics_path, ng = Path(layout.metrics(vol)), Path(layout.neuroglancer(vol))
        for label, path in (
            ("segmentation", Path(layout.seg(vol))),
            ("id map", id_map),
            ("metrics", metrics_path),
            ("objects table", Path(layout.objects(vol))),
            ("to proofread", Path(layout.suggestions(vol))),
            ("OME-Zarr", Path(layout.ome_zarr(vol))),
            ("neuroglancer export", ng),
            ("report plots", Path(layout.report_dir(vol))),
            ("logs", Path(layout.logs())),
        ):
            state = "" if path.exists() else "  (missing: run snakemake)"
            lines.append(f"  {label:<20} {path}{state}")
        if ng.exists():
            lines.append(f"  {'look at it':<20} emmito view {ng}")
            if Path(layout.suggestions(vol)).exists():
                lines.append(f"  {'first suggestion':<20} emmito view {ng} --suggestion 1")
        lines += _object_lines(Path(layout.objects(vol)))
        if metrics_path.exists():
            metrics = json.loads(metrics_path.read_text())
            for name, key, extra in METRIC_ROWS:
                if key in metrics:
                    suffix = f"{metrics[extra]:g}" if extra and extra in metrics else ""
                    lines.append(f"  {name + suffix:<28} {metrics[key]:.3f}")
            for key in ("gt_objects", "predicted_objects", "matched_objects"):
                if key in metrics:
                    lines.append(f"  {key:<28} {metrics[key]}")
            lines += _field_lines(metrics)
    lines.append("")
    lines.append("report     snakemake --report report.html  (training curves, scores, overlays, object sizes)")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    print(summarize(cfg.load(args.config), Path(args.results)))


def _object_lines(objects_csv: Path) -> list[str]:
    """Median volume and length of the objects in objects.csv, and how many are cut by the volume's edge."""
    if not objects_csv.exists():
        return []
    rows = read_objects(objects_csv)
    if not rows:
        return ["  objects.csv          no objects"]
    volume = float(np.median([row["volume_um3"] for row in rows]))
    length = float(np.median([row["length_um"] for row in rows]))
    cut = sum(row["touches_edge"] for row in rows)
    return [f"  median object        {volume:.4g} µm³, {length:.3g} µm long ({cut} of {len(rows)} cut by the volume's edge)"]


def _field_lines(metrics: dict[str, Any]) -> list[str]:
    """What ranked the objects for AP, and instance F1 per gt size tercile with the terciles' bounds."""
    lines = []
    if "ap_score" in metrics:
        lines.append(f"  {'AP ranked by':<28} {metrics['ap_score']}")
    bounds = metrics.get("size_tercile_bounds")
    f1s = [metrics.get(f"f1_{name}") for name in ("small", "medium", "large")]
    if bounds and None not in f1s:
        lines.append(
            f"  {'F1 small/medium/large':<28} {f1s[0]:.3f} / {f1s[1]:.3f} / {f1s[2]:.3f}"
            f"  (gt terciles: < {bounds[0]}, < {bounds[1]}, >= {bounds[1]} voxels)"
        )
    return lines
