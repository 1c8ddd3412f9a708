"""Embedding head on real EM: NNC foreground IoU against support-set size, and the decoders side by side.

    .venv/bin/python benchmarks/embedding_nnc.py [--data DIR] [--minutes 6] [--embedding-dim 8] [--2d]

Trains one small multi-task U-Net (a binary foreground logit plus an
embedding head, BCE + Dice + the discriminative loss) on CDeep3M
v2018/training at half resolution, then on v2018/validation (never trained on):

- NNC foreground IoU for support sets of 16 .. 16384 voxels drawn from the
  training volume's embeddings (class-balanced), against the binary head's IoU;
- foreground IoU and instance F1 (IoU 0.5, full resolution, as evaluate does)
  of heat_watershed on the binary channel, embedding_cluster, and nearest_neighbour.

``--data`` defaults to $EMMITO_CDEEP3M, else ../shared/data/cdeep3m-mito.
Nothing is written anywhere. This script builds the network itself
(``UNet3D`` with 1 + E outputs) so that it runs whatever the train stage
supports; the numbers are what a few CPU minutes buy, not a converged model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from emmito.convert import binary_to_instances  # noqa: E402
from emmito.embedding import build_support_set, discriminative_loss, embeddings_to_heat, nearest_neighbour_classify  # noqa: E402
from emmito.evaluate import evaluate_arrays  # noqa: E402
from emmito.infer import to_heat  # noqa: E402
from emmito.io import list_slices, read_png_slice  # noqa: E402
from emmito.model import UNet3D  # noqa: E402
from emmito.segment import decode  # noqa: E402
from emmito.targets import binary_target  # noqa: E402
from emmito.train import balanced_loss, pool_volume  # noqa: E402
from emmito.upsample import upsample_labels  # noqa: E402

SUPPORT_SIZES = (16, 64, 256, 1024, 4096, 16384)
EMBEDDING_RANGE = 8.0


def load_stack(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (z, y, x), instance ids uint32 (z, y, x)) of a CDeep3M images/ + labels/ pair."""
    images = np.stack([read_png_slice(p, "image") for p in list_slices(folder / "images")])
    mask = np.stack([read_png_slice(p, "label_binary") for p in list_slices(folder / "labels")])
    return images, binary_to_instances(mask)


def sample_patch(image: np.ndarray, label: np.ndarray, patch: tuple[int, int, int], rng: np.random.Generator):
    """A random (image, label) patch, centred on a labelled voxel half of the time, randomly flipped in y/x."""
    shape, size = np.array(image.shape), np.array(patch)
    if rng.random() < 0.5:
        voxels = np.flatnonzero(label)
        centre = np.array(np.unravel_index(voxels[rng.integers(len(voxels))], image.shape))
        start = np.clip(centre - size // 2, 0, shape - size)
    else:
        start = np.array([rng.integers(0, s - p + 1) for s, p in zip(shape, size)])
    box = tuple(slice(int(a), int(a + p)) for a, p in zip(start, size))
    img, lab = image[box], label[box]
    for axis in (1, 2):
        if rng.random() < 0.5:
            img, lab = np.flip(img, axis), np.flip(lab, axis)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def predict(model: torch.nn.Module, image: np.ndarray, norm: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(foreground probability float32 (z, y, x), embeddings float32 (E, z, y, x)) of a whole small volume."""
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(((image.astype(np.float32) - norm[0]) / norm[1])[None, None])
        out = model(x)[0]
    model.train()
    return torch.sigmoid(out[0]).numpy(), out[1:].numpy()


def iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.count_nonzero(predicted & truth) / max(1, np.count_nonzero(predicted | truth)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = os.environ.get("EMMITO_CDEEP3M", str(REPO.parent / "shared" / "data" / "cdeep3m-mito"))
    parser.add_argument("--data", type=Path, default=Path(default_data))
    parser.add_argument("--minutes", type=float, default=6.0, help="training wall-time budget")
    parser.add_argument("--embedding-dim", type=int, default=8)
    parser.add_argument("--2d", dest="two_d", action="store_true", help="2D U-Net (all levels 1x3x3, no z pooling)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.data / "v2018").is_dir():
        sys.exit(f"{args.data}/v2018 not found: pass --data or set EMMITO_CDEEP3M")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    factor = 2
    train_image, train_label = pool_volume(*load_stack(args.data / "v2018" / "training"), factor)
    val_full_image, val_full_label = load_stack(args.data / "v2018" / "validation")
    val_image, val_label = pool_volume(val_full_image, val_full_label, factor)
    norm = (float(train_image.mean()), float(train_image.std()))

    levels_3d = 99 if args.two_d else 2
    model = UNet3D([8, 16, 32, 32], 1 + args.embedding_dim, conv3d_from_level=levels_3d, pool_z_from_level=levels_3d)
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    patch = (8, 64, 64)
    started, iteration = time.monotonic(), 0
    while time.monotonic() - started < args.minutes * 60:
        pairs = [sample_patch(train_image, train_label, patch, rng) for _ in range(2)]
        x = torch.from_numpy(np.stack([(p[0].astype(np.float32) - norm[0]) / norm[1] for p in pairs])[:, None])
        instances = torch.from_numpy(np.stack([p[1].astype(np.int64) for p in pairs]))
        target = torch.from_numpy(np.stack([binary_target(p[1]) for p in pairs]).astype(np.float32))[:, None]
        out = model(x)
        binary = balanced_loss(out[:, :1], target)
        embedding, terms = discriminative_loss(out[:, 1:], instances)
        loss = binary + embedding
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if iteration % 50 == 0:
            print(f"it {iteration} ({time.monotonic() - started:.0f} s): binary {binary.item():.3f} "
                  f"var {terms['var'].item():.3f} dist {terms['dist'].item():.3f} reg {terms['reg'].item():.3f}", file=sys.stderr)
        iteration += 1
    print(f"trained {iteration} iterations in {time.monotonic() - started:.0f} s "
          f"({'2D' if args.two_d else '3D'} U-Net, embedding_dim {args.embedding_dim})")

    train_probability, train_embeddings = predict(model, train_image, norm)
    val_probability, val_embeddings = predict(model, val_image, norm)
    # Through the uint8 heat file's quantisation, as the workflow stores them.
    quantised = embeddings_to_heat(val_embeddings, EMBEDDING_RANGE)
    truth = val_label > 0
    print(f"binary head: validation foreground IoU {iou(val_probability > 0.5, truth):.3f}")
    print("| support voxels | k | NNC foreground IoU | seconds |")
    print("| ---: | ---: | ---: | ---: |")
    class_of_voxel = (train_label > 0).astype(np.int64)
    # The IoU table scores a fixed random tenth of the validation voxels (the CPU is small).
    scored = np.sort(rng.choice(truth.size, size=truth.size // 10, replace=False))
    scored_embeddings = val_embeddings.reshape(args.embedding_dim, -1)[:, scored][:, None, None]
    for size in SUPPORT_SIZES:
        features, classes = build_support_set(train_embeddings, class_of_voxel, size, seed=args.seed)
        tic = time.monotonic()
        # k at most a quarter of a class's share, or the vote is a tie between whole classes.
        k = min(16, max(1, size // 8))
        probabilities, _ = nearest_neighbour_classify(scored_embeddings, features, classes, k=k)
        nnc = probabilities[1].reshape(-1) > 0.5
        print(f"| {size} | {k} | {iou(nnc, truth.reshape(-1)[scored]):.3f} | {time.monotonic() - tic:.1f} |", flush=True)

    heat = to_heat(val_probability)
    channels = {"foreground": heat} | {f"emb{i}": quantised[i] for i in range(args.embedding_dim)}
    support = build_support_set(train_embeddings, class_of_voxel, 4096, seed=args.seed)
    print("| decoder | voxel IoU | instance F1 @0.5 | precision | recall | objects (gt) | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for decoder in ("heat_watershed", "embedding_cluster", "nearest_neighbour"):
        params = {"decoder": decoder, "min_size": 250, "min_seed_size": 25, "embedding_min_size": 250,
                  "nnc_candidates": 0}
        tic = time.monotonic()
        labels = decode(channels, params, support=support, embedding_range=EMBEDDING_RANGE)
        seconds = time.monotonic() - tic
        metrics = evaluate_arrays(upsample_labels(labels, factor, val_full_image.shape[1:]), val_full_label)
        print(f"| {decoder} | {metrics['voxel_iou']:.3f} | {metrics['instance_f1']:.3f} | "
              f"{metrics['instance_precision']:.3f} | {metrics['instance_recall']:.3f} | "
              f"{metrics['predicted_objects']} ({metrics['gt_objects']}) | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
