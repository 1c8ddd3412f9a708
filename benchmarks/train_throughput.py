"""Training throughput: samples/s and voxels/s of the training step (sampling, augmentation, forward, backward, AdamW).

    .venv/bin/python benchmarks/train_throughput.py [--config configs/cdeep3m.yaml] [--iterations 20] [--warmup 3]

Trains on a synthetic volume (``emmito.synth``) with the config's model and
train sections (patch, batch size, target, augmentation) on CUDA where present
(AMP on), else on CPU with train.threads. The first ``--warmup`` iterations
are not timed. Prints ``train_samples_per_s`` and ``train_voxels_per_s`` last.
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from emmito import config as config_module  # noqa: E402
from emmito import contract  # noqa: E402
from emmito.runtime import pick_device  # noqa: E402
from emmito.synth import synthesize  # noqa: E402
from emmito.train import train_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cdeep3m.yaml")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=256, help="synthetic volume side (y, x) at full resolution")
    args = parser.parse_args()

    params = config_module.load(args.config)
    patch = params["model"]["patch"]
    factor = params["model"][contract.DOWNSAMPLE_XY]
    slices = max(patch[0] * 2, 8)
    size = max(args.size, max(patch[1:]) * factor)
    image, label = synthesize(slices, size, seed=0)
    params["train"].update(iterations=args.iterations, max_minutes=0, val_every=10**9)
    device = pick_device()
    _, metrics = train_model([(image, label)], [], params, device=device, progress=False)
    timed = [m["seconds"] for m in metrics]
    seconds = timed[-1] - timed[args.warmup - 1] if args.warmup > 0 else timed[-1]
    iterations = len(metrics) - max(args.warmup, 0)
    batch = params["train"]["batch_size"]
    voxels = batch * patch[0] * patch[1] * patch[2]
    print(f"device: {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    print(f"patch {patch}, batch {batch}, {iterations} timed iterations in {seconds:.2f} s ({seconds / iterations:.3f} s/iteration)")
    print(f"train_samples_per_s: {iterations * batch / seconds:.3f}")
    print(f"train_voxels_per_s: {iterations * voxels / seconds:.0f}")


if __name__ == "__main__":
    main()
