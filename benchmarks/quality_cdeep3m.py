"""Quality on real EM: train on CDeep3M's training stacks, judge infer -> segment -> evaluate on the validation volumes.

    .venv/bin/python benchmarks/quality_cdeep3m.py [--data DIR] [--minutes 55] [--tta 8] [--no-tune]
        [--train-data both|v2018] [--holdout K] [--max-area-factor F]
        [--head embedding [--decoder embedding_cluster|nearest_neighbour] [--support-sizes 64,256,...]]

``--data`` defaults to $EMMITO_CDEEP3M, else ../shared/data/cdeep3m-mito beside
the repository. The settings are configs/cdeep3m.yaml's (model, train, infer,
segment), or ``--config``'s; ``--minutes`` caps training wall time
(train.max_minutes). ``--train-data both`` (default) trains on v2018/training
and v2020/training, ``v2018`` on the first alone. ``--head embedding`` trains the same network with an
embedding head (multi-task with the binary target, the discriminative loss)
and segments with ``--decoder`` (default embedding_cluster; nearest_neighbour
classifies by the support set drawn from the training volume's embeddings,
``--support-sizes`` adds a table of NNC foreground IoU against its size).
Nothing is written into the data folder or the repository: the checkpoint and
the per-volume metrics go to a temporary folder (``--keep DIR`` keeps them).

The chain is the package's own functions on whole volumes: the image is
mean-pooled by model.downsample_xy and predicted with ``predict_slices``
(which equals chunked inference by construction; ``--tta`` as infer.tta),
segmented as one block with ``segment.decode``, upsampled to full resolution
with ``upsample_labels`` and scored with ``evaluate_arrays`` against the 3D
connected components of the mask (as ``convert`` makes them; AP ranks each
object by its mean foreground probability, as seg.h5's object_scores do).
Validation is never used for training or for choosing anything: by default
the decoder's settings are chosen on the training volumes with
``emmito.tuning.tune``, the tune rule's search, on the heat the rule predicts
(the schema's infer grid, no test-time augmentation); with ``--no-tune`` they
are a ``decoder.json`` beside ``--checkpoint`` where there is one, else the
untuned defaults (keys the config sets win, as in segment). No size filter
by default; ``--max-area-factor F`` sets segment.max_area_2d to F times the
widest cross-section of a training mitochondrion (and prints the figures
without it too). ``--holdout K`` makes model choices without validation: it
trains and tunes on the training stacks minus v2018's first K slices (and a
gap), judges those K and reads no validation folder (last line
``holdout_iou: X``). The settings used and the training iterations are
printed beside the figures; the last line is ``cdeep3m_val_iou: X``.
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
from emmito import contract, tune, tuning  # noqa: E402
from emmito.convert import binary_to_instances  # noqa: E402
from emmito.decoders import decode, nearest_neighbour_classify, resolve_decoder  # noqa: E402
from emmito.embedding import heat_to_embeddings  # noqa: E402
from emmito.io import list_slices, read_png_slice, write_json  # noqa: E402
from emmito.labels import slice_heat_sums  # noqa: E402
from emmito.metrics import evaluate_arrays, object_scores  # noqa: E402
from emmito.model import embedding_dim, load_checkpoint, parameter_count  # noqa: E402
from emmito.prediction import TTA_COUNTS, predict_volume, to_heat  # noqa: E402
from emmito.resampling import mean_pool_xy, mode_pool_xy, pool_pair, upsample_labels  # noqa: E402
from emmito.runtime import keep_freed_memory, thread_count  # noqa: E402
from emmito.tiling import PATCH_GRID, plan_tiling  # noqa: E402
from emmito.train import support_set, train_model, training_embeddings  # noqa: E402

DECODERS = ("auto", "heat_watershed", "bc_watershed", "embedding_cluster", "nearest_neighbour")


def load_stack(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (z, y, x), instance ids uint32 (z, y, x)) of a CDeep3M images/ + labels/ pair."""
    images = np.stack([read_png_slice(p, "image") for p in list_slices(folder / "images")])
    mask = np.stack([read_png_slice(p, "label_binary") for p in list_slices(folder / "labels")])
    return images, binary_to_instances(mask)


TRAIN_DATA = ("v2018", "both")
HOLDOUT_GAP = 2  # slices dropped between the held-out slices and training: a mitochondrion spans several


def training_stacks(data: Path, which: str, holdout: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray] | None]:
    """(training volumes, the held-out (image, instance ids) or None) from the training folders only.

    ``which``: v2018 (v2018/training, z010-029) or both (plus v2020/training, z020-039: the same
    tissue processed differently, 10 slices beyond v2018's). ``holdout`` K > 0 keeps v2018's first K
    slices out (with ``HOLDOUT_GAP`` more as a gap); v2020's slices start at z020, so they stay clear
    of the held-out ones for K + gap <= 10.
    """
    image, gt = load_stack(data / "v2018" / "training")
    held = None
    if holdout:
        if holdout + HOLDOUT_GAP > 10 or holdout + HOLDOUT_GAP >= len(image) - 4:
            sys.exit(f"--holdout {holdout}: at most {10 - HOLDOUT_GAP} slices (v2020/training starts 10 slices in)")
        held = (image[:holdout], binary_to_instances(gt[:holdout] > 0))
        image, gt = image[holdout + HOLDOUT_GAP:], binary_to_instances(gt[holdout + HOLDOUT_GAP:] > 0)
    stacks = [(image, gt)]
    if which == "both":
        stacks.append(load_stack(data / "v2020" / "training"))
    return stacks, held


def predict_heat(model: torch.nn.Module, image: np.ndarray, params: dict, input_norm: dict | None, tta: int | None = None) -> np.ndarray:
    """uint8 heat (channel, z, y, x) of a full-resolution uint8 volume, at the inference scale, as infer writes it."""
    pooled = mean_pool_xy(image, factor(params))
    tta = params["infer"]["tta"] if tta is None else tta
    return to_heat(predict_volume(model, pooled, params, "cpu", input_norm, tta=tta))


def factor(params: dict) -> int:
    return params["model"][contract.DOWNSAMPLE_XY]


def score_heat(heat: np.ndarray, gt: np.ndarray, params: dict, channels: list[str], segment_cfg: dict, support=None) -> dict:
    """segment -> upsample -> evaluate of one volume's heat against full-resolution instance ids."""
    labels = decode(dict(zip(channels, heat)), segment_cfg, support=support)
    full = upsample_labels(labels, factor(params), gt.shape[1:])
    return evaluate_arrays(full, gt, scores=mean_probabilities(labels, heat[channels.index("foreground" if "foreground" in channels else channels[0])]))


def mean_probabilities(labels: np.ndarray, foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mean foreground probability) of the objects of ``labels``, at the heat's scale: segment's per-slice
    sums (``labels.slice_heat_sums``) summed per object as trace sums them, read as evaluate reads seg.h5's."""
    rows = slice_heat_sums(labels, foreground)
    ids, where = np.unique(rows[:, 0], return_inverse=True)
    table = np.stack([ids, np.bincount(where, weights=rows[:, 2]), np.bincount(where, weights=rows[:, 3])], axis=1)
    return object_scores(table.astype(np.int64))


def tune_on_training(model: torch.nn.Module, stacks: list[tuple], params: dict, channels: list[str], input_norm: dict | None, support=None) -> dict:
    """decoder.json's record for the model, chosen on the training volumes alone by the tune rule's search.

    The heat is predicted as the tune rule predicts it (``emmito.tune``: the
    schema's default infer grid, test-time augmentation ``tune.TTA``), the
    labels mode-pooled to the inference scale; ``tuning.tune`` does the rest.
    """
    tune_params = {**params, "infer": tune.tuning_infer_section()}
    volumes = []
    for index, (image, gt) in enumerate(stacks):
        heat = predict_heat(model, image, tune_params, input_norm, tta=tune.TTA)
        labels = pool_pair(image[:1], gt, factor(params))[1]
        volumes.append(tuning.TuneVolume(f"cdeep3m_train{index}", dict(zip(channels, heat)), labels, (0, len(labels))))
    tuned = tuning.tune(volumes, params["segment"], support, progress=True)
    return tuned.record()


def widest_cross_section(labels: np.ndarray) -> int:
    """The largest area (pixels) any object of ``labels`` (uint (z, y, x)) has in one slice."""
    return max((int(np.bincount(plane.reshape(-1))[1:].max(initial=0)) for plane in labels), default=0)


def support_table(model: torch.nn.Module, checkpoint: dict, train: tuple, image: np.ndarray, gt: np.ndarray, params: dict, sizes: list[int]) -> None:
    """Print NNC foreground IoU (every voxel classified, at the inference scale) against the support-set size."""
    dim = embedding_dim(params["model"])
    heat = predict_heat(model, image, params, checkpoint.get("input_norm"))
    embeddings = heat_to_embeddings(heat[-dim:])
    truth = pool_pair(image, gt, factor(params))[1] > 0
    embedded = training_embeddings(checkpoint, [train], params)  # once: the sets below are draws from it
    print("| support voxels | k | NNC foreground IoU (v2018 validation) | seconds |")
    print("| ---: | ---: | ---: | ---: |")
    for size in sizes:
        support_params = {**params, "train": {**params["train"], "discriminative": {**params["train"]["discriminative"], "support_voxels": size}}}
        features, classes = support_set(checkpoint, [train], support_params, embedded=embedded)
        k = min(params["segment"]["nnc_k"], max(1, size // 8))  # at most a quarter of a class, or votes tie whole classes
        tic = time.perf_counter()
        _, class_map = nearest_neighbour_classify(embeddings, features, classes, k)
        predicted = class_map > 0
        iou = np.count_nonzero(predicted & truth) / max(1, np.count_nonzero(predicted | truth))
        print(f"| {size} | {k} | {iou:.3f} | {time.perf_counter() - tic:.1f} |", flush=True)


OLD_TILING = PATCH_GRID


def foreground_iou(heat: np.ndarray, gt: np.ndarray, params: dict, channels: list[str]) -> float | None:
    """Voxel IoU of the thresholded foreground channel (before any decoder) against the labels, at the inference scale;
    None for a model without one (skeleton_distance)."""
    if "foreground" not in channels:
        return None
    key = "bc_foreground" if "contour" in channels else "foreground_threshold"
    predicted = heat[channels.index("foreground")] >= params["segment"][key]
    truth = mode_pool_xy(gt, factor(params)) > 0
    return np.count_nonzero(predicted & truth) / max(1, np.count_nonzero(predicted | truth))


def score_with_and_without_filter(heat: np.ndarray, gt: np.ndarray, params: dict, channels: list[str], support=None) -> tuple[dict, dict]:
    """(scores with the config's segment settings, scores with segment.max_area_2d off): the same dict when it is off."""
    scored = score_heat(heat, gt, params, channels, params["segment"], support)
    if not params["segment"]["max_area_2d"]:
        return scored, scored
    return scored, score_heat(heat, gt, params, channels, {**params["segment"], "max_area_2d": 0}, support)


def compare_tiling(name: str, grids: dict[str, tuple[np.ndarray, dict, dict]], params: dict, channels: list[str], gt: np.ndarray) -> None:
    """Print, per grid (label -> (heat, scores, scores without max_area_2d), old grid first), the thresholded-foreground
    IoU, the decoded IoU without segment.max_area_2d and the IoU, F1 and 2D F1 with the config's segment settings."""
    rows = []
    for label, (heat, scored, plain) in grids.items():
        fg = foreground_iou(heat, gt, params, channels)
        rows.append((fg, plain["voxel_iou"], scored["voxel_iou"]))
        print(f"{name} {label}: foreground iou {'n/a' if fg is None else f'{fg:.4f}'}; without max_area_2d iou "
              f"{plain['voxel_iou']:.4f} f1 {plain['instance_f1']:.4f}; with it iou {scored['voxel_iou']:.4f} "
              f"f1 {scored['instance_f1']:.4f} f1_2d {scored['f1_2d']:.4f}")
    (old_heat, *_), (new_heat, *_) = grids.values()
    (old_fg, *old), (new_fg, *new) = rows
    fg_change = "n/a" if old_fg is None else f"{new_fg - old_fg:+.4f}"
    difference = np.abs(old_heat.astype(np.int16) - new_heat.astype(np.int16)).mean()
    print(f"{name} new - old: foreground iou {fg_change}, iou without max_area_2d {new[0] - old[0]:+.4f}, "
          f"with it {new[1] - old[1]:+.4f}; mean |heat difference| {difference:.2f} grey levels")


def with_tiling(params: dict, tiling: dict) -> dict:
    return {**params, "infer": {**params["infer"], **tiling}}


def sweep_tiling(model, train: tuple, params: dict, channels: list[str], input_norm: dict | None, support=None) -> None:
    """On the training volume only: IoU and mean |heat - old heat| for crops and overlaps of infer.tile auto."""
    old = predict_heat(model, train[0], with_tiling(params, OLD_TILING), input_norm, tta=1)
    old_iou = score_heat(old, train[1], params, channels, params["segment"], support)["voxel_iou"]
    print(f"tiling sweep on the training volume (tta 1): old grid iou {old_iou:.4f}")
    variants = [{"tile_crop": [2, c, c], "tile_overlap": 0} for c in (0, 8, 16, 32)]
    variants += [{"tile_crop": [z, 16, 16], "tile_overlap": 0} for z in (0, 1, 3)]
    variants += [{"tile_crop": [2, 16, 16], "tile_overlap": [0, o, o]} for o in (0.125, 0.25)]
    variants += [{"tile_crop": [2, 16, 16], "tile_overlap": [0.25, 0, 0]}]
    # The tile size alone (GroupNorm statistics and context): the same crop, no overlap, growing y/x tiles.
    auto_z = plan_tiling(params["model"], params["infer"], (len(train[0]), 1, 1)).z.tile
    variants += [{"tile": [auto_z, t, t], "tile_crop": [2, 16, 16], "tile_overlap": 0} for t in (96, 160, 288)]
    for variant in variants:
        heat = predict_heat(model, train[0], with_tiling(params, {"tile": "auto", **variant}), input_norm, tta=1)
        iou = score_heat(heat, train[1], params, channels, params["segment"], support)["voxel_iou"]
        difference = np.abs(heat.astype(np.int16) - old.astype(np.int16)).mean()
        print(f"  auto {variant}: iou {iou:.4f} ({iou - old_iou:+.4f}), mean |heat - old heat| {difference:.2f} grey levels")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("EMMITO_CDEEP3M", str(REPO.parent / "shared" / "data" / "cdeep3m-mito"))
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cdeep3m.yaml")
    parser.add_argument("--minutes", type=float, default=55.0, help="training wall-time budget (at most 60 on CPU)")
    parser.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    parser.add_argument("--threads", type=int, default=None, help="override train.threads and infer.threads")
    parser.add_argument("--tta", type=int, default=None, choices=TTA_COUNTS, help="override infer.tta (flip/transpose variants)")
    parser.add_argument("--head", choices=("target", "embedding"), default=None, help="override model.head")
    parser.add_argument("--embedding-dim", type=int, default=None, help="override model.embedding_dim")
    parser.add_argument("--decoder", choices=DECODERS, default=None,
                        help="override segment.decoder (with --head embedding the default is embedding_cluster)")
    parser.add_argument("--support-sizes", default="", help="comma-separated support-set sizes for an NNC IoU table")
    parser.add_argument("--no-tune", dest="tune", action="store_false",
                        help="do not choose segment thresholds on the training volume (default: the tune rule's search, on training only)")
    parser.add_argument("--max-area-factor", type=float, default=0.0,
                        help="segment.max_area_2d = this x the widest cross-section of a training mitochondrion (default 0: off)")
    parser.add_argument("--train-data", choices=TRAIN_DATA, default="both",
                        help="v2018: v2018/training; both: also v2020/training as a second volume (z020-039, 10 slices beyond v2018's)")
    parser.add_argument("--holdout", type=int, default=0, metavar="K",
                        help="model selection without validation: hold out v2018/training's first K slices (and the next "
                             f"{HOLDOUT_GAP} as a gap), train and tune on the rest, judge on the K; validation is not read")
    parser.add_argument("--checkpoint", type=Path, default=None, help="evaluate this checkpoint instead of training")
    parser.add_argument("--keep", type=Path, default=None, help="folder (outside the repo) to keep checkpoint and metrics in")
    parser.add_argument("--compare-tiling", action="store_true",
                        help="also score the old window grid (training patch, overlap 0.5, no crop) from the same checkpoint")
    parser.add_argument("--sweep-tiling", action="store_true", help="crops and overlaps of infer.tile auto, on the training volume")
    args = parser.parse_args()
    if not (args.data / "v2018").is_dir():
        sys.exit(f"{args.data}/v2018 not found: pass --data or set EMMITO_CDEEP3M")

    params = config_module.load(args.config)
    params["train"]["max_minutes"] = args.minutes
    if args.iterations:
        params["train"]["iterations"] = args.iterations
    if args.threads is not None:
        params["train"]["threads"] = params["infer"]["threads"] = args.threads
    if args.tta is not None:
        params["infer"]["tta"] = args.tta
    if args.head:
        params["model"]["head"] = args.head
    if args.embedding_dim:
        params["model"]["embedding_dim"] = args.embedding_dim
    if args.decoder:
        params["segment"]["decoder"] = args.decoder
    elif params["model"]["head"] == "embedding":
        params["segment"]["decoder"] = "embedding_cluster"
    params = config_module.validate(params, source=str(args.config))
    keep_freed_memory()  # as the stage CLIs do
    torch.set_num_threads(thread_count(params["train"]["threads"]))
    out_dir = args.keep or Path(tempfile.mkdtemp(prefix="emmito-cdeep3m-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    stacks, held = training_stacks(args.data, args.train_data, args.holdout)
    train = stacks[0]
    if args.checkpoint is None:
        shapes = ", ".join("x".join(map(str, image.shape)) for image, _ in stacks)
        print(f"training on {shapes} for at most {args.minutes} min" + (f" ({args.holdout} v2018 slices held out)" if held else ""),
              file=sys.stderr)
        started = time.perf_counter()
        checkpoint, metrics = train_model(stacks, [], params, device="cpu")
        minutes = (time.perf_counter() - started) / 60
        checkpoint_path = out_dir / "cdeep3m.pt"
        contract.save_checkpoint(checkpoint_path, checkpoint)
        (out_dir / "train_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    else:
        checkpoint_path, minutes = args.checkpoint, float("nan")
    model, checkpoint = load_checkpoint(checkpoint_path, params["model"], explicit=params.explicit)
    model = model.model  # the bare network: predict_volume wraps it for the heat of every channel
    channels = list(checkpoint["channels"])
    support = support_set(checkpoint, stacks, params) if params["segment"]["decoder"] == "nearest_neighbour" else None
    if args.max_area_factor > 0:  # from the training labels alone, never from validation
        widest = widest_cross_section(pool_pair(train[0][:1], train[1], factor(params))[1])
        params["segment"]["max_area_2d"] = int(args.max_area_factor * widest)
        print(f"max_area_2d: {params['segment']['max_area_2d']} px ({args.max_area_factor} x the widest training "
              f"mitochondrion's {widest} px at the inference scale)")
    decoder, heat_name = resolve_decoder(params["segment"]["decoder"], channels)
    beside = Path(contract.decoder_settings_beside(checkpoint_path))
    if args.tune:
        tuned = tune_on_training(model, stacks, params, channels, checkpoint.get("input_norm"), support)
        contract.save_decoder_settings(out_dir / contract.DECODER_SETTINGS_FILE, tuned)
        print(f"tuned on training: score {tuned['score']:.4f} (F1 over IoU 0.5-0.95), F1 {tuned['instance_f1']:.4f}; untuned "
              f"{tuned['untuned']['score']:.4f}, {tuned['untuned']['instance_f1']:.4f}; {len(tuned['trials'])} trials")
    else:
        tuned = contract.load_decoder_settings(beside) if beside.exists() else None
    heat_kind = tuning.heat_kind(channels if heat_name in channels else [heat_name])
    params["segment"], sources = tuning.resolve_settings(params["segment"], params.explicit, tuned, decoder, heat_kind)
    settings_line = tuning.describe(params["segment"], sources)
    print(f"segment settings: {settings_line}")

    if args.sweep_tiling:
        sweep_tiling(model, train, params, channels, checkpoint.get("input_norm"), support)
    results = {}
    judged = [("holdout", None)] if held else [("v2018", args.data / "v2018" / "validation"), ("v2020", args.data / "v2020" / "validation")]
    for name, folder in judged:
        image, gt = held if folder is None else load_stack(folder)
        heat = predict_heat(model, image, params, checkpoint.get("input_norm"))
        results[name], unfiltered = score_with_and_without_filter(heat, gt, params, channels, support)
        if args.compare_tiling:
            old_heat = predict_heat(model, image, with_tiling(params, OLD_TILING), checkpoint.get("input_norm"))
            infer_cfg = params["infer"]
            compare_tiling(name, {
                "old grid (patch, overlap 0.5, no crop)": (old_heat, *score_with_and_without_filter(old_heat, gt, params, channels, support)),
                f"new grid ({infer_cfg['tile']}, overlap {infer_cfg['tile_overlap']}, crop {infer_cfg['tile_crop']})": (heat, results[name], unfiltered),
            }, params, channels, gt)
        if params["segment"]["max_area_2d"]:
            print(f"{name} without max_area_2d: iou {unfiltered['voxel_iou']:.4f} f1 {unfiltered['instance_f1']:.4f} "
                  f"f1_2d {unfiltered['f1_2d']:.4f} precision {unfiltered['voxel_precision']:.4f}")
        write_json(out_dir / f"metrics_{name}.json", results[name])
        if name == "v2018" and args.support_sizes:
            support_table(model, checkpoint, train, image, gt, params, [int(s) for s in args.support_sizes.split(",")])
    print(f"checkpoint: {checkpoint_path} ({parameter_count(model)} parameters, {checkpoint['iteration']} iterations, "
          f"head={params['model']['head']}, decoder={decoder}, tta={params['infer']['tta']})")
    if held:
        scores = results["holdout"]
        print(f"holdout: {args.holdout} v2018 training slices, objects gt/pred/matched: "
              f"{scores['gt_objects']}/{scores['predicted_objects']}/{scores['matched_objects']}  precision "
              f"{scores['voxel_precision']:.4f} recall {scores['voxel_recall']:.4f}  training_iterations: {checkpoint['iteration']}")
        print(f"holdout ap50 {scores['ap50']:.4f} ap75 {scores['ap75']:.4f} voi split/merge {scores['voi_split']:.4f}/"
              f"{scores['voi_merge']:.4f} arand {scores['arand']:.4f}")
        print(f"holdout_f1_2d: {scores['f1_2d']:.4f}")
        print(f"holdout_f1: {scores['instance_f1']:.4f}")
        print(f"holdout_iou: {scores['voxel_iou']:.4f}")
        return
    v2020, v2018 = results["v2020"], results["v2018"]
    print(
        f"cdeep3m_v2020_val_iou: {v2020['voxel_iou']:.4f}  cdeep3m_v2020_val_f1: {v2020['instance_f1']:.4f}  "
        f"cdeep3m_v2020_val_f1_2d: {v2020['f1_2d']:.4f}"
    )
    print(
        f"cdeep3m_val_precision: {v2018['voxel_precision']:.4f}  cdeep3m_val_recall: {v2018['voxel_recall']:.4f}  "
        f"objects gt/pred/matched: {v2018['gt_objects']}/{v2018['predicted_objects']}/{v2018['matched_objects']}"
    )
    print(f"cdeep3m_val_ap50: {v2018['ap50']:.4f}  cdeep3m_val_ap75: {v2018['ap75']:.4f}  voi split/merge "
          f"{v2018['voi_split']:.4f}/{v2018['voi_merge']:.4f}  arand {v2018['arand']:.4f}  F1 small/medium/large "
          + "/".join("n/a" if v2018[k] is None else f"{v2018[k]:.3f}" for k in ("f1_small", "f1_medium", "f1_large")))
    print(f"training_minutes: {minutes:.1f}  training_iterations: {checkpoint['iteration']}")
    print(f"decoder: {decoder}  settings: {settings_line}  training_iterations: {checkpoint['iteration']}")
    print(f"cdeep3m_val_f1_2d: {v2018['f1_2d']:.4f}")
    print(f"cdeep3m_val_f1: {v2018['instance_f1']:.4f}")
    print(f"cdeep3m_val_iou: {v2018['voxel_iou']:.4f}")


if __name__ == "__main__":
    main()
