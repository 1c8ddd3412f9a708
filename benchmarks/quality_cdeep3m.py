"""Quality on real EM: train on CDeep3M v2018/training, judge infer -> segment -> evaluate on the validation volumes.

    .venv/bin/python benchmarks/quality_cdeep3m.py [--data DIR] [--minutes 40] [--tta]

``--data`` defaults to $EMMITO_CDEEP3M, else ../shared/data/cdeep3m-mito beside
the repository. The settings are configs/cdeep3m.yaml's (model, train, infer,
segment); ``--minutes`` caps training wall time (train.max_minutes). Nothing is
written into the data folder or the repository: the checkpoint and the
per-volume metrics go to a temporary folder (``--keep DIR`` keeps them).

The chain is the package's own functions on whole volumes: the image is
mean-pooled by infer.downsample_xy and predicted with ``predict_slices``
(which equals chunked inference by construction), segmented as one block with
``segment.decode``, upsampled to full resolution with ``upsample_labels`` and
scored with ``evaluate_arrays`` against the 3D connected components of the
mask (as ``convert`` makes them). Validation is never used for training or
for choosing anything. The last line is ``cdeep3m_val_iou: X``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from emmito import config as config_module  # noqa: E402
from emmito.convert import binary_to_instances  # noqa: E402
from emmito.evaluate import evaluate_arrays  # noqa: E402
from emmito.infer import job_threads, mean_pool_xy, to_heat  # noqa: E402
from emmito.io import list_slices, read_png_slice, write_json  # noqa: E402
from emmito.model import FlipAverage, parameter_count  # noqa: E402
from emmito.segment import decode  # noqa: E402
from emmito.train import predict_volume, save_checkpoint, train_model  # noqa: E402
from emmito.upsample import upsample_labels  # noqa: E402


def load_stack(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (z, y, x), instance ids uint32 (z, y, x)) of a CDeep3M images/ + labels/ pair."""
    images = np.stack([read_png_slice(p, "image") for p in list_slices(folder / "images")])
    mask = np.stack([read_png_slice(p, "label_binary") for p in list_slices(folder / "labels")])
    return images, binary_to_instances(mask)


def decoder_channels(target: str) -> str:
    """The segment decoder that fits a model target."""
    return "bc_watershed" if target == "binary_contour" else "heat_watershed"


def predict_heat(model: torch.nn.Module, image: np.ndarray, params: dict) -> np.ndarray:
    """uint8 heat (channel, z, y, x) of a full-resolution uint8 volume, at the inference scale."""
    return to_heat(predict_volume(model, mean_pool_xy(image, params["infer"]["downsample_xy"]), params, "cpu"))


def score_heat(heat: np.ndarray, gt: np.ndarray, params: dict, channels: list[str], segment_cfg: dict) -> dict:
    """segment -> upsample -> evaluate of one volume's heat against full-resolution instance ids."""
    segment_cfg = {**segment_cfg, "decoder": decoder_channels(params["model"]["target"])}
    labels = decode({name: heat[i] for i, name in enumerate(channels)}, segment_cfg)
    full = upsample_labels(labels, params["infer"]["downsample_xy"], gt.shape[1:])
    return evaluate_arrays(full, gt)


def evaluate_volume(model: torch.nn.Module, image: np.ndarray, gt: np.ndarray, params: dict, channels: list[str]) -> dict:
    """Full chain on one in-memory volume -> evaluate's metrics dict."""
    return score_heat(predict_heat(model, image, params), gt, params, channels, params["segment"])


def tune_segment(model: torch.nn.Module, image: np.ndarray, gt: np.ndarray, params: dict, channels: list[str]) -> dict:
    """The segment section with foreground_threshold and min_size chosen by IoU + F1 + 2D F1 on (training) data."""
    heat = predict_heat(model, image, params)
    best, best_score = dict(params["segment"]), -1.0
    for threshold in (64, 96, 128, 160, 192):
        for min_size in (300, 600, 1000):
            candidate = {**params["segment"], "foreground_threshold": threshold, "min_size": min_size,
                         "seed_threshold": max(params["segment"]["seed_threshold"], threshold)}
            metrics = score_heat(heat, gt, params, channels, candidate)
            score = metrics["voxel_iou"] + metrics["instance_f1"] + metrics["f1_2d"]
            print(f"tune on training: foreground_threshold {threshold} min_size {min_size}: iou {metrics['voxel_iou']:.3f} "
                  f"f1 {metrics['instance_f1']:.3f} f1_2d {metrics['f1_2d']:.3f}", file=sys.stderr)
            if score > best_score:
                best, best_score = candidate, score
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("EMMITO_CDEEP3M", str(REPO.parent / "shared" / "data" / "cdeep3m-mito"))
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cdeep3m.yaml")
    parser.add_argument("--minutes", type=float, default=40.0, help="training wall-time budget (at most 60 on CPU)")
    parser.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    parser.add_argument("--tta", type=int, default=0, help="average predictions over this many yx flips/transposes (0 - off, up to 8)")
    parser.add_argument("--tune", action="store_true", help="choose segment thresholds on the training volume (never on validation)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="evaluate this checkpoint instead of training")
    parser.add_argument("--keep", type=Path, default=None, help="folder (outside the repo) to keep checkpoint and metrics in")
    args = parser.parse_args()

    params = config_module.load(args.config)
    params["train"]["max_minutes"] = args.minutes
    if args.iterations:
        params["train"]["iterations"] = args.iterations
    torch.set_num_threads(job_threads(params["train"]["threads"]))
    out_dir = args.keep or Path(tempfile.mkdtemp(prefix="emmito-cdeep3m-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    from emmito.infer import load_checkpoint

    if args.checkpoint is None:
        train_image, train_gt = load_stack(args.data / "v2018" / "training")
        print(f"training on {train_image.shape} for at most {args.minutes} min", file=sys.stderr)
        started = time.perf_counter()
        checkpoint, metrics = train_model([(train_image, train_gt)], [], params, device="cpu")
        minutes = (time.perf_counter() - started) / 60
        checkpoint_path = out_dir / "cdeep3m.pt"
        save_checkpoint(checkpoint_path, checkpoint)
        (out_dir / "train_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
        iterations = checkpoint["iteration"]
    else:
        checkpoint_path, minutes, iterations = args.checkpoint, float("nan"), None
    model, checkpoint = load_checkpoint(checkpoint_path, params["model"])
    iterations = checkpoint["iteration"] if iterations is None else iterations
    channels = list(checkpoint["channels"])
    if args.tta:
        model = FlipAverage(model, params["model"]["target"], transforms=args.tta)
    if args.tune:
        train_image, train_gt = load_stack(args.data / "v2018" / "training")
        params["segment"] = tune_segment(model, train_image, train_gt, params, channels)
        print(f"segment chosen on training: foreground_threshold {params['segment']['foreground_threshold']}, "
              f"min_size {params['segment']['min_size']}")

    results = {}
    for name, folder in (("v2018", args.data / "v2018" / "validation"), ("v2020", args.data / "v2020" / "validation")):
        image, gt = load_stack(folder)
        results[name] = evaluate_volume(model, image, gt, params, channels)
        write_json(out_dir / f"metrics_{name}.json", results[name])
    print(f"checkpoint: {checkpoint_path} ({parameter_count(model)} parameters, {iterations} iterations, tta={args.tta})")
    v2020, v2018 = results["v2020"], results["v2018"]
    print(
        f"cdeep3m_v2020_val_iou: {v2020['voxel_iou']:.4f}  cdeep3m_v2020_val_f1: {v2020['instance_f1']:.4f}  "
        f"cdeep3m_v2020_val_f1_2d: {v2020['f1_2d']:.4f}"
    )
    print(
        f"cdeep3m_val_precision: {v2018['voxel_precision']:.4f}  cdeep3m_val_recall: {v2018['voxel_recall']:.4f}  "
        f"objects gt/pred/matched: {v2018['gt_objects']}/{v2018['predicted_objects']}/{v2018['matched_objects']}"
    )
    print(f"training_minutes: {minutes:.1f}  training_iterations: {iterations}")
    print(f"cdeep3m_val_f1_2d: {v2018['f1_2d']:.4f}")
    print(f"cdeep3m_val_f1: {v2018['instance_f1']:.4f}")
    print(f"cdeep3m_val_iou: {v2018['voxel_iou']:.4f}")


if __name__ == "__main__":
    main()
