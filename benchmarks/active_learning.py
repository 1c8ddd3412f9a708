"""Does active learning pay? Label the regions ``emmito suggest`` ranks first, or as many at random, and compare.

    nice -n 10 .venv/bin/python benchmarks/active_learning.py [--seeds 0,1,2] [--k 4]
        [--uncertainty tta_std|entropy] [--model demo|small] [--no-replay]
        [--base-iterations 400] [--tune-iterations 200]

About 11 minutes per seed on one core (the demo network, 3 random draws).

Per seed, three synthetic volumes (``emmito.synth``) of the same tissue:

- **A** (24 x 192 x 192, the default look): a model (``--model``: config.yaml's
  demo network by default) is trained on all of it from scratch (the base model);
- **B** (16 x 256 x 256), the pool to label from: the default look, except
  that a 128 x 128 (y, x) part of it, at a place drawn with the seed, holds
  look-alike processes (``synthesize(decoys=...)``: pale tubes with a dark rim
  and no cristae, not mitochondria, not in A), as a real volume holds a
  region the labelled crop did not show;
- **C** (the same generator as B, its own seed and its own look-alike part):
  the test volume.

The base model predicts B with ``infer.uncertainty`` (``predict_slices``, the
infer stage's call: ``--uncertainty tta_std`` with ``infer.tta`` 4, or
``entropy``); B's heat is segmented (``decoders.decode``) and scanned by the
suggest stage's own functions (``suggest.new_scan`` / ``add_slab`` /
``region_rows``) into boxes of ``--region`` voxels ranked by summed
uncertainty. Two arms then label ``--k`` boxes of B with B's ground truth,
inside the boxes only: **suggested** takes suggest's top k; **random** draws k
boxes uniformly (with the seed) from the same grid, excluding none,
``--random-draws`` times (3), each draw fine-tuned and scored on its own, and
its IoU is their mean (what labelling k boxes at random gives on average; one
draw alone is as likely to be lucky as not). Each arm
fine-tunes the base model (``train.init_from``, the same iterations, learning
rate and seed) on A and on B with B's labels inside its boxes and a valid
mask of the boxes (a partly labelled training volume, as
``volumes.<name>.labels_offset`` / ``valid`` register a proofread crop: the
loss is masked, unlabelled voxels are not background, patches are centred in
the boxes); ``--no-replay`` fine-tunes on B's boxes alone. Each is scored on C: the heat segmented with
the segment defaults (no tuning, the same for every model) and evaluated with
``metrics.evaluate_arrays`` (voxel IoU of the instances, F1 at IoU 0.5).

Printed per seed: the base model's IoU on C, iou_suggested, iou_random and
their difference (with F1 and the IoU inside and outside C's look-alike part),
which boxes each arm labelled and how many of them touch B's look-alike part;
then the iteration counts and wall time, and last ``al_gain: X``, the smallest
per-seed difference: > 0 means the suggested regions beat random ones in every
seed. Deterministic: one torch thread, fixed seeds; the same figures on every
run of one machine. Nothing is written outside a temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from emmito import contract, suggest  # noqa: E402
from emmito.config import section_defaults, validate_sections  # noqa: E402
from emmito.decoders import decode  # noqa: E402
from emmito.infer import UNCERTAINTY_SOURCE  # noqa: E402
from emmito.metrics import evaluate_arrays  # noqa: E402
from emmito.model import build_model, heat_model, output_channels  # noqa: E402
from emmito.prediction import predict_slices, to_heat  # noqa: E402
from emmito.runtime import keep_freed_memory  # noqa: E402
from emmito.synth import synthesize  # noqa: E402
from emmito.tiling import batch_windows, plan_tiling  # noqa: E402
from emmito.train import train_model  # noqa: E402

MODELS = {
    # config.yaml's demo network (~280k parameters) and a smaller, faster one
    "demo": {"filters": [8, 16, 32, 64], "patch": [16, 96, 96]},
    "small": {"filters": [8, 16, 32], "patch": [8, 64, 64], "conv3d_from_level": 1, "pool_z_from_level": 1},
}
MODEL = dict(MODELS["demo"])
VOXEL_SIZE = [40.0, 8.0, 8.0]
A_SHAPE = (24, 192)  # slices, size
POOL_SHAPE = (16, 256)  # B and C
HARD_SIZE = 128  # y/x side of the look-alike part of B and C
DECOYS = 20  # look-alike processes in it (16 x 128 x 128 voxels)
BASE_TRAIN = {"batch_size": 2, "learning_rate": 0.003, "warmup_iterations": 20}
TUNE_TRAIN = {"batch_size": 2, "learning_rate": 0.001, "warmup_iterations": 10}


def volume(seed: int, volume_seed: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple[slice, ...]]:
    """(image, instance ids, the look-alike part (z, y, x slices)) of a B/C-like volume; the part's place from ``seed``."""
    rng = np.random.default_rng([seed, volume_seed])
    y0, x0 = (int(rng.integers(0, shape[1] - HARD_SIZE + 1)) for _ in range(2))
    region = (slice(None), slice(y0, y0 + HARD_SIZE), slice(x0, x0 + HARD_SIZE))
    image, labels = synthesize(*shape, seed=volume_seed, decoys=DECOYS, decoy_region=region)
    return image, labels, region


def train_params(seed: int, iterations: int, train: dict, init_from: str = "") -> dict:
    """Train's sections as the CLI gives them (one thread, no validation); fine-tuning sets no model key."""
    base = {"iterations": iterations, "threads": 1, "workers": 0, "val_every": 10**6, **train}
    model = {} if init_from else dict(MODEL)
    return validate_sections({"seed": seed, "model": model, "train": {**base, **({"init_from": init_from} if init_from else {})}})


def network(checkpoint: dict) -> torch.nn.Module:
    model = build_model(checkpoint[contract.CHECKPOINT_MODEL_CONFIG])
    model.load_state_dict(checkpoint[contract.CHECKPOINT_STATE])
    return model.eval()


def predict(checkpoint: dict, image: np.ndarray, infer_cfg: dict) -> np.ndarray:
    """uint8 heat (channel, z, y, x) of a whole in-memory volume, as infer's ``predict_slices`` call makes it
    (``infer.uncertainty`` adds the uncertainty channel last)."""
    model_cfg = checkpoint[contract.CHECKPOINT_MODEL_CONFIG]
    tiling = plan_tiling(model_cfg, infer_cfg, image.shape)
    probabilities = predict_slices(
        heat_model(network(checkpoint), model_cfg),
        lambda a, b: image[a:b],
        image.shape[0],
        0,
        image.shape[0],
        tiling,
        batch_windows(model_cfg, infer_cfg, tiling, len(output_channels(model_cfg))),
        "cpu",
        input_norm=checkpoint[contract.CHECKPOINT_INPUT_NORM],
        blend_sigma=infer_cfg["blend_sigma"],
        progress=False,
        tta=infer_cfg["tta"],
        uncertainty=infer_cfg["uncertainty"],
        uncertainty_channel=UNCERTAINTY_SOURCE,
    )
    return to_heat(probabilities)


def segment(heat: np.ndarray, channels: list[str]) -> np.ndarray:
    """Instances of a heat volume with the segment defaults (the decoder ``auto`` picks)."""
    return decode(dict(zip(channels, heat)), section_defaults("segment"))


def ranked_boxes(heat: np.ndarray, channels: list[str], kind: str, region: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """(suggest's uncertain_region boxes of B, most uncertain first; every box of the same grid), (z0, y0, x0, z1, y1, x1)."""
    labels = segment(heat[: len(channels)], channels)
    shape = tuple(int(n) for n in labels.shape)
    frame = suggest.Frame(shape, VOXEL_SIZE, shape, 1)
    scan = suggest.new_scan(frame, int(labels.max()), region, {})
    suggest.add_slab(scan, 0, labels, heat[channels.index("foreground")], heat[-1], Path("B"))
    rows = suggest.region_rows(scan, kind, scan.regions.size, frame)
    ranked = [[int(row[key]) for key in ("z0", "y0", "x0", "z1", "y1", "x1")] for row in rows]
    rz, ry, rx = scan.region
    grid = [[z, y, x, min(z + rz, shape[0]), min(y + ry, shape[1]), min(x + rx, shape[2])]
            for z in range(0, shape[0], rz) for y in range(0, shape[1], ry) for x in range(0, shape[2], rx)]
    return ranked, grid


def box_slices(box: list[int]) -> tuple[slice, slice, slice]:
    return tuple(slice(low, high) for low, high in zip(box[:3], box[3:]))


def touches(box: list[int], region: tuple[slice, ...], shape: tuple[int, ...]) -> bool:
    """Whether ``box`` overlaps the look-alike part ``region``."""
    return all(max(lo, r.indices(n)[0]) < min(hi, r.indices(n)[1]) for lo, hi, r, n in zip(box[:3], box[3:], region, shape))


def labelled_volumes(image: np.ndarray, labels: np.ndarray, boxes: list[list[int]]) -> list[tuple[np.ndarray, ...]]:
    """The training data of an arm: B, its labels known inside the boxes only (the valid mask), unlabelled elsewhere."""
    valid = np.zeros(labels.shape, bool)
    for box in boxes:
        valid[box_slices(box)] = True
    return [(image, np.where(valid, labels, 0).astype(labels.dtype), valid)]


def score(checkpoint: dict, image: np.ndarray, gt: np.ndarray, region: tuple[slice, ...], infer_cfg: dict) -> dict:
    """voxel_iou and instance_f1 of the model's instances on C, and the voxel IoU inside and outside its look-alike part."""
    channels = list(checkpoint[contract.CHECKPOINT_CHANNELS])
    labels = segment(predict(checkpoint, image, {**infer_cfg, "tta": 1, "uncertainty": "none"}), channels)
    result = evaluate_arrays(labels, gt)
    inside = np.zeros(gt.shape, bool)
    inside[region] = True
    for name, where in (("iou_lookalike", inside), ("iou_rest", ~inside)):
        predicted, truth = labels[where] > 0, gt[where] > 0
        result[name] = np.count_nonzero(predicted & truth) / max(1, np.count_nonzero(predicted | truth))
    return result


def run_seed(seed: int, args: argparse.Namespace, folder: Path) -> dict:
    started = time.perf_counter()
    train_a = synthesize(*A_SHAPE, seed=1000 * seed + 1)
    pool_image, pool_labels, pool_region = volume(seed, 1000 * seed + 2, POOL_SHAPE)
    test_image, test_labels, test_region = volume(seed, 1000 * seed + 3, POOL_SHAPE)

    base, _ = train_model([train_a], [], train_params(seed, args.base_iterations, BASE_TRAIN), device="cpu",
                          progress=False, voxel_size=VOXEL_SIZE)
    base_path = folder / f"base_{seed}.pt"
    contract.save_checkpoint(base_path, base)
    base_seconds = time.perf_counter() - started

    infer_cfg = section_defaults("infer")
    infer_cfg.update(uncertainty=args.uncertainty, tta=4 if args.uncertainty == "tta_std" else 1)
    channels = list(base[contract.CHECKPOINT_CHANNELS])
    ranked, grid = ranked_boxes(predict(base, pool_image, infer_cfg), channels, args.uncertainty, args.region)
    draw = np.random.default_rng([seed, 7])
    arms = [("suggested", ranked[: args.k])]
    arms += [(f"random {d + 1}", [grid[i] for i in sorted(draw.choice(len(grid), args.k, replace=False))])
             for d in range(args.random_draws)]

    result = {"seed": seed, "base": score(base, test_image, test_labels, test_region, infer_cfg), "boxes": len(grid)}
    for arm, boxes in arms:
        volumes = labelled_volumes(pool_image, pool_labels, boxes) + ([train_a] if args.replay else [])
        tuned, _ = train_model(volumes, [],
                               train_params(seed, args.tune_iterations, TUNE_TRAIN, init_from=str(base_path)),
                               device="cpu", progress=False, voxel_size=VOXEL_SIZE)
        result[arm] = score(tuned, test_image, test_labels, test_region, infer_cfg)
        result[arm]["boxes"] = boxes
        result[arm]["lookalike_boxes"] = sum(touches(box, pool_region, pool_image.shape) for box in boxes)
        result[arm]["iterations"] = tuned[contract.CHECKPOINT_ITERATION]
    draws = [result[arm] for arm, _ in arms[1:]]
    # The random arm: the mean over its draws (the expected result of labelling k boxes at random).
    result["random"] = {key: float(np.mean([d[key] for d in draws])) for key in ("voxel_iou", "instance_f1", "iou_lookalike", "iou_rest")}
    result["random"]["draws"] = [arm for arm, _ in arms[1:]]
    result["base_iterations"] = base[contract.CHECKPOINT_ITERATION]
    result["seconds"] = time.perf_counter() - started
    result["base_seconds"] = base_seconds
    return result


def print_seed(r: dict, k: int) -> None:
    base, sug, ran = r["base"], r["suggested"], r["random"]
    print(f"seed {r['seed']}: base_iou {base['voxel_iou']:.4f} (f1 {base['instance_f1']:.4f}, look-alike part "
          f"{base['iou_lookalike']:.4f}, rest {base['iou_rest']:.4f})")
    for arm in ["suggested", *ran["draws"]]:
        s = r[arm]
        where = " ".join(f"{b[0]}:{b[1]}:{b[2]}" for b in s["boxes"])
        print(f"  {arm:9s} iou {s['voxel_iou']:.4f} f1 {s['instance_f1']:.4f} look-alike part {s['iou_lookalike']:.4f} "
              f"rest {s['iou_rest']:.4f}; {s['lookalike_boxes']}/{k} boxes touch B's look-alike part; boxes (z0:y0:x0) {where}")
    print(f"  random (mean of {len(ran['draws'])} draws) iou {ran['voxel_iou']:.4f} f1 {ran['instance_f1']:.4f} "
          f"look-alike part {ran['iou_lookalike']:.4f} rest {ran['iou_rest']:.4f}")
    print(f"  seed {r['seed']}: iou_suggested {sug['voxel_iou']:.4f}  iou_random {ran['voxel_iou']:.4f}  "
          f"diff {sug['voxel_iou'] - ran['voxel_iou']:+.4f}  (f1 diff {sug['instance_f1'] - ran['instance_f1']:+.4f}; "
          f"{r['seconds']:.0f} s, base training {r['base_seconds']:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3 for the issue's figure)")
    parser.add_argument("--k", type=int, default=4, help="boxes each arm labels")
    parser.add_argument("--region", type=int, nargs=3, default=[8, 64, 64], metavar=("Z", "Y", "X"),
                        help="suggest.region: the box (full-resolution voxels) the pool is tiled into")
    parser.add_argument("--uncertainty", choices=("tta_std", "entropy"), default="tta_std",
                        help="infer.uncertainty of the base model's prediction of B (tta_std with infer.tta 4)")
    parser.add_argument("--model", choices=sorted(MODELS), default="demo", help="the network: config.yaml's demo one, or a smaller one")
    parser.add_argument("--replay", action=argparse.BooleanOptionalAction, default=True,
                        help="fine-tune on the labelled boxes and A together (as a lab keeps its first training volume), "
                             "or --no-replay: on the boxes alone")
    parser.add_argument("--random-draws", type=int, default=3,
                        help="random arm: this many independent draws of k boxes, each fine-tuned; its IoU is their mean")
    parser.add_argument("--base-iterations", type=int, default=400)
    parser.add_argument("--tune-iterations", type=int, default=200)
    args = parser.parse_args()
    MODEL.clear()
    MODEL.update(MODELS[args.model])
    keep_freed_memory()
    torch.set_num_threads(1)
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"model {MODEL}; A {A_SHAPE[0]}x{A_SHAPE[1]}x{A_SHAPE[1]}, B and C {POOL_SHAPE[0]}x{POOL_SHAPE[1]}x{POOL_SHAPE[1]} "
          f"with {DECOYS} look-alike processes in a {HARD_SIZE}x{HARD_SIZE} part; boxes {args.region}, k {args.k}; "
          f"uncertainty {args.uncertainty}; fine-tuning on the boxes{' and A' if args.replay else ' alone'}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="emmito-al-") as folder:
        for seed in seeds:
            results.append(run_seed(seed, args, Path(folder)))
            print_seed(results[-1], args.k)
    diffs = [r["suggested"]["voxel_iou"] - r["random"]["voxel_iou"] for r in results]
    r0 = results[0]
    print(f"iterations: base {r0['base_iterations']}, fine-tuning {r0['suggested']['iterations']} per arm and draw; "
          f"{len(seeds)} seeds; {r0['boxes']} boxes in B, {args.k} labelled per arm")
    print(f"per-seed diff (iou_suggested - iou_random): {' '.join(f'{d:+.4f}' for d in diffs)}; mean {np.mean(diffs):+.4f}")
    print(f"wall_seconds: {time.perf_counter() - started:.0f}")
    print(f"al_gain: {min(diffs):.4f}")


if __name__ == "__main__":
    main()
