"""``emmito summary CONFIG``: one screen on what a finished run produced and where it is."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from emmito import config as cfg

METRIC_ROWS = (
    ("instance F1@IoU", "instance_f1", "iou_threshold"),
    ("instance precision", "instance_precision", None),
    ("instance recall", "instance_recall", None),
    ("2D instance F1 (per slice)", "f1_2d", None),
    ("voxel IoU (foreground)", "voxel_iou", None),
    ("voxel precision", "voxel_precision", None),
    ("voxel recall", "voxel_recall", None),
)


def summarize(config: dict[str, Any], results: Path = Path("results")) -> str:
    """A short text report of every segmented volume: objects, metrics and output paths."""
    lines = []
    model_dir = results / "model" / config["model"]["name"]
    lines.append(f"model      {model_dir / 'checkpoint.pt'}  (training log: {model_dir / 'metrics.jsonl'})")
    for vol in config["infer"]["volumes"]:
        base = results / vol
        lines.append("")
        lines.append(f"volume '{vol}'")
        id_map = base / "trace.json"
        if id_map.exists():
            objects = json.loads(id_map.read_text()).get("objects", {})
            lines.append(f"  objects found        {len(objects)}")
        for label, path in (
            ("segmentation", base / "seg.h5"),
            ("id map", id_map),
            ("metrics", base / "metrics.json"),
            ("neuroglancer export", base / "ng"),
            ("report plots", base / "report"),
            ("logs", results / "logs"),
        ):
            state = "" if path.exists() else "  (missing: run snakemake)"
            lines.append(f"  {label:<20} {path}{state}")
        if (base / "ng").exists():
            lines.append(f"  {'look at it':<20} emmito view {base / 'ng'}")
        metrics_path = base / "metrics.json"
        if metrics_path.exists():
            metrics = json.loads(metrics_path.read_text())
            for name, key, extra in METRIC_ROWS:
                if key in metrics:
                    suffix = f"{metrics[extra]:g}" if extra and extra in metrics else ""
                    lines.append(f"  {name + suffix:<28} {metrics[key]:.3f}")
            for key in ("gt_objects", "predicted_objects", "matched_objects"):
                if key in metrics:
                    lines.append(f"  {key:<28} {metrics[key]}")
    lines.append("")
    lines.append("report     snakemake --report report.html  (training curves, scores, overlays, object sizes)")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    print(summarize(cfg.load(args.config), Path(args.results)))
