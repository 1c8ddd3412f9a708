"""Inference throughput: the pipeline's chunk inference against the bare network, and its memory vs depth.

In one process, on the same tiles, it times

- (a) the pipeline: ``emmito.infer.run_cli`` for one chunk, i.e. reading the
  chunk plus its halo from ``image.h5``, tiling, the network, Gaussian blending,
  uint8 conversion and writing ``chunk_{c}.h5``;
- (b) the bare network: ``model(x)`` under ``torch.inference_mode`` over exactly
  the input batches the pipeline gave the model (recorded in a warm-up run: the
  same tiles, batch size and count).

Both are reported in network voxels per second (tiles x patch voxels), so their
ratio is the share of the time the network has; the pipeline's rate in chunk
(output) voxels is printed too. Runs alternate (a, b, a, b, ...) after a
warm-up, and the medians are compared.

Then it measures the peak RSS of ``emmito infer`` (a fresh subprocess each) for the same chunk index of a base volume and of one 4x
deeper, with the same (small, fast) model: the ratio shows whether memory
follows the chunk or the volume. The peak is the child's own VmHWM.

Prints MVx/s figures, ``infer_rss_ratio: R`` and, as the last line,
``infer_overhead_ratio: R`` (pipeline MVx/s / bare MVx/s).

Run: .venv/bin/python benchmarks/infer_throughput.py [--size 256] [--chunk-slices 20] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from emmito import __version__, blocks, contract, infer, prediction, runtime
from emmito.config import section_defaults
from emmito.io import create_volume, open_volume
from emmito.model import build_model, check_patch, load_checkpoint


def write_image(path: Path, depth: int, size: int, seed: int = 0) -> None:
    """A uint8 (depth, size, size) EM-like image (smoothed noise), written 8 slices at a time."""
    rng = np.random.default_rng(seed)
    with create_volume(path, (depth, size, size), np.uint8, voxel_size=[40, 8, 8]) as dataset:
        for first in range(0, depth, 8):
            count = min(8, depth - first)
            noise = rng.normal(128, 40, (count, size // 4 + 1, size // 4 + 1))
            coarse = np.repeat(np.repeat(noise, 4, axis=1), 4, axis=2)[:, :size, :size]
            fine = rng.normal(0, 12, (count, size, size))
            dataset[first : first + count] = np.clip(coarse + fine, 0, 255).astype(np.uint8)


def write_checkpoint(path: Path, model_cfg: dict[str, Any], seed: int = 0) -> None:
    """A randomly initialised model in emmito's checkpoint format (weights do not change the speed)."""
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    checkpoint = {
        contract.CHECKPOINT_MODEL_CONFIG: model_cfg,
        contract.CHECKPOINT_STATE: model.state_dict(),
        contract.CHECKPOINT_CHANNELS: ["foreground"],
        contract.CHECKPOINT_INPUT_NORM: dict(prediction.DEFAULT_INPUT_NORM),
        contract.CHECKPOINT_VERSION: __version__,
    }
    contract.save_checkpoint(path, checkpoint)


class Recorder(torch.nn.Module):
    """Passes batches to the model and keeps a copy of each, for the bare timing."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.clone())
        return self.model(x)


def run_pipeline(image: Path, checkpoint: Path, out: Path, chunk: int, params: dict[str, Any]) -> float:
    """Seconds for ``emmito infer`` of one chunk, in this process (the CLI's core path)."""
    args = argparse.Namespace(image=image, checkpoint=checkpoint, out=out, chunk=chunk)
    # The progress bar goes to a buffer: it costs the same, without filling the terminal.
    with contextlib.redirect_stderr(io.StringIO()):
        start = time.perf_counter()
        infer.run_cli(args, params)
        return time.perf_counter() - start


def run_bare(model: torch.nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    """Seconds for ``model(x)`` over ``batches``, nothing else."""
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            with runtime.autocast(device):
                model(batch.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# Runs an emmito verb and prints the process's own peak RSS. getrusage(RUSAGE_CHILDREN) or wait4 would not
# do: Linux carries the forking parent's peak over into the child's ru_maxrss at exec.
_PEAK_RSS_WRAPPER = (
    "import sys\n"
    "from emmito.cli import main\n"
    "status = main(sys.argv[1:])\n"
    "peak = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
    "print('peak_rss_kib', peak)\n"
    "sys.exit(status)\n"
)


def peak_rss_mb(emmito_args: list[str]) -> float:
    """Peak resident memory (MiB, VmHWM) of a fresh process running ``emmito EMMITO_ARGS``; exits if it fails."""
    result = subprocess.run([sys.executable, "-c", _PEAK_RSS_WRAPPER, *emmito_args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"emmito {' '.join(emmito_args)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    kib = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("peak_rss_kib"))
    return int(kib) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=60, help="depth of the throughput volume")
    parser.add_argument("--size", type=int, default=192, help="slice height and width (pixels)")
    parser.add_argument("--chunk-slices", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=1, help="chunk index timed (an inner one has halos both sides)")
    parser.add_argument("--filters", type=int, nargs="+", default=section_defaults("model")["filters"])
    parser.add_argument("--patch", type=int, nargs=3, default=section_defaults("model")["patch"])
    parser.add_argument("--batch-size", type=int, default=section_defaults("infer")["batch_size"])
    parser.add_argument("--tta", type=int, default=1, choices=prediction.TTA_COUNTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: all cores); on a shared 2-core machine 1 gives the steadier figure")
    parser.add_argument("--rss-slices", type=int, default=64, help="depth of the base volume for the RSS ratio")
    parser.add_argument("--rss-size", type=int, default=1024)
    parser.add_argument("--rss-filters", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--rss-patch", type=int, nargs=3, default=[4, 128, 128])
    parser.add_argument("--rss-overlap", type=float, default=0.0,
                        help="tile overlap of the RSS runs: 0 keeps them fast; memory does not depend on it")
    parser.add_argument("--depth-factor", type=int, default=4)
    args = parser.parse_args()

    device = runtime.pick_device()
    model_cfg = {**section_defaults("model"), "filters": args.filters, "patch": args.patch}
    check_patch(args.patch, model_cfg, "--patch")
    infer_cfg = {
        **section_defaults("infer"),
        "chunk_slices": args.chunk_slices,
        "batch_size": args.batch_size,
        "tta": args.tta,
        "threads": args.threads,
    }
    params = {"model": model_cfg, "infer": infer_cfg}
    torch.set_num_threads(runtime.thread_count(args.threads))

    with tempfile.TemporaryDirectory(prefix="emmito-infer-bench-") as folder:
        work = Path(folder)
        image, checkpoint, out = work / "image.h5", work / "ckpt.pt", work / "chunk.h5"
        write_image(image, args.slices, args.size)
        write_checkpoint(checkpoint, model_cfg)
        model, _ = load_checkpoint(checkpoint, model_cfg, device)

        # The warm-up (of the model and the pipeline's code); the recorded batches are what the pipeline feeds the network.
        recorder = Recorder(model)
        with open_volume(image) as dataset:
            infer.infer_chunk(recorder, lambda a, b: dataset[a:b], args.slices, args.chunk, model_cfg, infer_cfg, device,
                              progress=False)
        batches = recorder.batches
        tiles = sum(batch.shape[0] for batch in batches) // args.tta
        network_voxels = tiles * int(np.prod(args.patch)) * args.tta
        z_start, z_stop = blocks.chunk_range(args.chunk, args.chunk_slices, args.slices)
        chunk_voxels = (z_stop - z_start) * args.size * args.size

        pipeline_seconds, bare_seconds = [], []
        for _ in range(args.repeats):
            pipeline_seconds.append(run_pipeline(image, checkpoint, out, args.chunk, params))
            bare_seconds.append(run_bare(model, batches, device))
        pipeline, bare = statistics.median(pipeline_seconds), statistics.median(bare_seconds)

        print(f"device: {device.type}, torch threads {torch.get_num_threads()}, model filters {args.filters}, patch {args.patch}, "
              f"batch {args.batch_size}, tta {args.tta}")
        print(f"chunk {args.chunk} of {args.chunk_slices} slices of a {args.slices} x {args.size}^2 volume: "
              f"{tiles} tiles in {len(batches)} model calls, {network_voxels / 1e6:.1f} MVx through the network")
        print(f"pipeline seconds: {' '.join(f'{s:.2f}' for s in pipeline_seconds)} (median {pipeline:.2f})")
        print(f"bare model seconds: {' '.join(f'{s:.2f}' for s in bare_seconds)} (median {bare:.2f})")
        paired = statistics.median(b / p for p, b in zip(pipeline_seconds, bare_seconds))
        print(f"median of paired ratios (bare s / pipeline s, same repeat): {paired:.3f}")
        print(f"pipeline_network_mvx_per_s: {network_voxels / pipeline / 1e6:.3f}")
        print(f"bare_network_mvx_per_s: {network_voxels / bare / 1e6:.3f}")
        print(f"pipeline_chunk_mvx_per_s: {chunk_voxels / pipeline / 1e6:.3f}  (output voxels of the chunk)")

        # Memory: same chunk, same model, volumes of depth D and 4D, each in a fresh process.
        rss_model = {**section_defaults("model"), "filters": args.rss_filters, "patch": args.rss_patch}
        check_patch(args.rss_patch, rss_model, "--rss-patch")
        rss_checkpoint = work / "rss_ckpt.pt"
        write_checkpoint(rss_checkpoint, rss_model)
        rss_params = json.dumps({"model": rss_model, "infer": {**infer_cfg, "tta": 1, "tile_overlap": args.rss_overlap}})
        peaks = []
        for depth in (args.rss_slices, args.rss_slices * args.depth_factor):
            volume = work / f"rss_{depth}.h5"
            write_image(volume, depth, args.rss_size, seed=1)
            peaks.append(peak_rss_mb(["infer", str(volume), str(rss_checkpoint), str(work / "rss_chunk.h5"),
                                      "--chunk", str(args.chunk), "--params", rss_params]))
            volume.unlink()
        print(f"peak RSS of emmito infer, chunk {args.chunk}: {peaks[0]:.0f} MB at {args.rss_slices} x {args.rss_size}^2, "
              f"{peaks[1]:.0f} MB at {args.rss_slices * args.depth_factor} x {args.rss_size}^2")
        print(f"infer_rss_ratio: {peaks[1] / peaks[0]:.3f}")
        print(f"infer_overhead_ratio: {(network_voxels / pipeline) / (network_voxels / bare):.3f}")


if __name__ == "__main__":
    main()
