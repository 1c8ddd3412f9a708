"""Inference cost per output voxel: the window grid's redundancy and the chunk job's speed against the bare network.

For one interior chunk (chunk 1 of 20 slices of a 60 x 1024^2 synthetic volume)
and each of two models, the demo config's (config.yaml) and the cdeep3m
config's (configs/cdeep3m.yaml: wider, 2 output channels, pooled 2x in y/x), it
prints, for the grid of releases before 0.6 (``old``: windows of the training
patch, ``tile_overlap`` 0.5, no crop) and for the current defaults (``new``:
``infer.tile`` auto, the schema's overlap, crop and memory budget):

- ``redundancy``: voxels actually fed to the network / voxels the chunk writes,
  counted by a wrapper around the network during a run of the pipeline (the
  count needs no real network: a stand-in returning zeros runs the same grid);
- for ``new`` (and ``old`` with ``--time-old``, slow on CPU: each old chunk runs
  about ten times the voxels): the median seconds of the chunk job
  (``emmito.infer.run_cli``: read, pool, tile, network, blend, write the heat
  file; the model loaded once before), its output MVx/s, and the bare network's
  MVx/s on one window of the training patch (batch 1, ``torch.inference_mode``),
  timed alternately with the job after a warm-up; ``output_ratio`` = the first
  over the second.

Then the peak RSS of ``emmito infer`` (fresh processes, a small fast model) for
the same chunk of a 64- and a 256-slice volume: ``infer_rss_ratio`` shows that
memory follows the chunk, not the volume.

The last two lines are the worse of the two configs under the new defaults:
``infer_redundancy: R`` and ``infer_output_ratio: R``. Test-time augmentation
is off (``infer.tta`` multiplies the network's work by its count, by design).

Run: .venv/bin/python benchmarks/infer_throughput.py [--threads 1] [--repeats 2] [--time-old] [--size 1024]
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
import yaml

from emmito import __version__, blocks, contract, infer, prediction, runtime
from emmito.config import section_defaults
from emmito.io import create_volume, open_volume
from emmito.model import build_model, output_channels
from emmito.tiling import PATCH_GRID

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"demo": REPO / "config.yaml", "cdeep3m": REPO / "configs" / "cdeep3m.yaml"}
OLD = PATCH_GRID


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


def model_section(name: str) -> dict[str, Any]:
    """The model section of a repository config, defaults filled."""
    with open(CONFIGS[name]) as handle:
        return {**section_defaults("model"), **yaml.safe_load(handle).get("model", {})}


def write_checkpoint(path: Path, model_cfg: dict[str, Any], seed: int = 0) -> None:
    """A randomly initialised model in emmito's checkpoint format (weights do not change the speed)."""
    torch.manual_seed(seed)
    model = build_model(model_cfg)
    checkpoint = {
        contract.CHECKPOINT_MODEL_CONFIG: model_cfg,
        contract.CHECKPOINT_STATE: model.state_dict(),
        contract.CHECKPOINT_CHANNELS: output_channels(model_cfg),
        contract.CHECKPOINT_DOWNSAMPLE_XY: model_cfg[contract.DOWNSAMPLE_XY],
        contract.CHECKPOINT_INPUT_NORM: dict(prediction.DEFAULT_INPUT_NORM),
        contract.CHECKPOINT_VERSION: __version__,
    }
    contract.save_checkpoint(path, checkpoint)


class Counter(torch.nn.Module):
    """Counts the voxels it is fed and answers zeros of the right shape: the grid's cost without the network's."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.voxels = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.voxels += x.numel()
        return torch.zeros((x.shape[0], self.channels, *x.shape[2:]), dtype=x.dtype)


def count_redundancy(image: Path, model_cfg: dict[str, Any], infer_cfg: dict[str, Any], chunk: int, depth: int) -> tuple[float, str]:
    """(voxels fed to the network / voxels written, the tiling) for one chunk, counted on a stand-in network."""
    counter = Counter(len(output_channels(model_cfg)))
    with open_volume(image) as dataset:
        shape = dataset.shape
        factor = model_cfg[contract.DOWNSAMPLE_XY]
        tiling = infer.infer_chunks(
            counter, lambda a, b: dataset[a:b], shape, [chunk], model_cfg, infer_cfg, lambda c, first, heat: None,
            factor=factor, progress=False,
        )
    z_start, z_stop = blocks.chunk_range(chunk, infer_cfg["chunk_slices"], depth)
    written = (z_stop - z_start) * -(-shape[1] // factor) * -(-shape[2] // factor)
    return counter.voxels / written, tiling.describe()


def run_job(image: Path, checkpoint: Path, out: Path, chunk: int, params: dict[str, Any],
            loaded: tuple[torch.nn.Module, dict, dict], device: torch.device) -> float:
    """Seconds for the chunk job's work (``write_heat_chunks``: what ``emmito infer`` does after loading the model)."""
    model, ckpt, model_cfg = loaded
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar costs the same, unseen
        start = time.perf_counter()
        infer.write_heat_chunks(model, ckpt, checkpoint, image, {chunk: out}, model_cfg, params["infer"], device)
        return time.perf_counter() - start


def run_bare(model: torch.nn.Module, window: torch.Tensor, device: torch.device, count: int) -> float:
    """Seconds per window for ``model(window)``, ``count`` times, nothing else."""
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(count):
            with runtime.autocast(device):
                model(window)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / count


def time_tiling(name: str, label: str, image: Path, work: Path, model_cfg: dict, infer_cfg: dict, args, device) -> float:
    """Time the chunk job against the bare network; print the figures; return the output ratio."""
    checkpoint = work / f"{name}.pt"
    write_checkpoint(checkpoint, model_cfg)
    params = {"model": model_cfg, "infer": infer_cfg}
    loaded = infer.load_for_inference(checkpoint, params, device)
    network = loaded[0]
    window = torch.from_numpy(np.random.default_rng(1).normal(0, 1, (1, 1, *model_cfg["patch"])).astype(np.float32)).to(device)
    out = work / f"{name}_{label}.h5"
    run_job(image, checkpoint, out, args.chunk, params, loaded, device)  # warm-up
    run_bare(network, window, device, 2)
    jobs, bares = [], []
    for _ in range(args.repeats):
        jobs.append(run_job(image, checkpoint, out, args.chunk, params, loaded, device))
        bares.append(run_bare(network, window, device, args.bare_windows))
    job, bare = statistics.median(jobs), statistics.median(bares)
    factor = model_cfg[contract.DOWNSAMPLE_XY]
    z_start, z_stop = blocks.chunk_range(args.chunk, args.chunk_slices, args.slices)
    written = (z_stop - z_start) * (-(-args.size // factor)) ** 2
    output_rate = written / job / 1e6
    bare_rate = float(np.prod(model_cfg["patch"])) / bare / 1e6
    print(f"  {label}: chunk job seconds {' '.join(f'{s:.1f}' for s in jobs)} (median {job:.1f}): output {output_rate:.3f} MVx/s; "
          f"bare network on one {'x'.join(map(str, model_cfg['patch']))} window {bare_rate:.3f} MVx/s; "
          f"output_ratio {output_rate / bare_rate:.3f}")
    return output_rate / bare_rate


def startup_seconds(name: str, work: Path, model_cfg: dict, args) -> float:
    """Wall seconds of a fresh ``emmito infer`` process on a tiny volume: Python, imports, reading the model, one window."""
    checkpoint, image = work / f"{name}_startup.pt", work / "tiny.h5"
    write_checkpoint(checkpoint, model_cfg)
    write_image(image, 4, 64)
    params = json.dumps({"infer": {"chunk_slices": 4, "threads": args.threads}})
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "emmito.cli", "infer", str(image), str(checkpoint), str(work / "tiny_heat.h5"),
                             "--chunk", "0", "--params", params], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"emmito infer failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def peak_rss_mb(emmito_args: list[str]) -> float:
    """Peak resident memory (MiB, the process's own VmHWM) of a fresh process running ``emmito EMMITO_ARGS``."""
    wrapper = (
        "import sys\nfrom emmito.cli import main\nstatus = main(sys.argv[1:])\n"
        "peak = next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
        "print('peak_rss_kib', peak)\nsys.exit(status)\n"
    )
    result = subprocess.run([sys.executable, "-c", wrapper, *emmito_args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"emmito {' '.join(emmito_args)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return int(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("peak_rss_kib"))) / 1024


def rss_ratio(work: Path, args) -> None:
    model_cfg = {**section_defaults("model"), "filters": [4, 8], "patch": [4, 128, 128]}
    checkpoint = work / "rss.pt"
    write_checkpoint(checkpoint, model_cfg)
    params = json.dumps({"model": model_cfg, "infer": {"chunk_slices": args.chunk_slices, "threads": args.threads}})
    peaks = []
    for depth in (64, 256):
        volume = work / f"rss_{depth}.h5"
        write_image(volume, depth, args.size, seed=1)
        peaks.append(peak_rss_mb(["infer", str(volume), str(checkpoint), str(work / "rss_chunk.h5"), "--chunk", str(args.chunk),
                                  "--params", params]))
        volume.unlink()
    print(f"peak RSS of emmito infer, chunk {args.chunk}: {peaks[0]:.0f} MB at 64 x {args.size}^2, {peaks[1]:.0f} MB at 256 x {args.size}^2")
    print(f"infer_rss_ratio: {peaks[1] / peaks[0]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=60)
    parser.add_argument("--size", type=int, default=1024, help="slice height and width (pixels, full resolution)")
    parser.add_argument("--chunk-slices", type=int, default=20)
    parser.add_argument("--chunk", type=int, default=1, help="the chunk measured (an inner one has halos both sides)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bare-windows", type=int, default=10, help="windows per bare-network timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: all cores)")
    parser.add_argument("--time-old", action="store_true", help="also time the old grid (about 10x the network work)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--no-rss", action="store_true")
    args = parser.parse_args()

    device = runtime.pick_device()
    torch.set_num_threads(runtime.thread_count(args.threads))
    print(f"device: {device.type}, torch threads {torch.get_num_threads()}; chunk {args.chunk} ({args.chunk_slices} slices) "
          f"of a {args.slices} x {args.size}^2 volume; tta 1")
    redundancies, ratios = {}, {}
    with tempfile.TemporaryDirectory(prefix="emmito-infer-bench-") as folder:
        work = Path(folder)
        image = work / "image.h5"
        write_image(image, args.slices, args.size)
        for name in args.configs:
            model_cfg = model_section(name)
            base = {**section_defaults("infer"), "chunk_slices": args.chunk_slices, "threads": args.threads, "tta": 1}
            print(f"{name}: filters {model_cfg['filters']}, patch {model_cfg['patch']}, downsample_xy {model_cfg[contract.DOWNSAMPLE_XY]}, "
                  f"{len(output_channels(model_cfg))} channels")
            for label, infer_cfg in (("old", {**base, **OLD}), ("new", base)):
                redundancy, tiling = count_redundancy(image, model_cfg, infer_cfg, args.chunk, args.slices)
                print(f"  {label}: windows {tiling}: redundancy {redundancy:.2f}")
                if label == "new":
                    redundancies[name] = redundancy
            if args.time_old:
                time_tiling(name, "old", image, work, model_cfg, {**base, **OLD}, args, device)
            ratios[name] = time_tiling(name, "new", image, work, model_cfg, base, args, device)
            print(f"  job start-up (a fresh emmito infer on a 4 x 64^2 volume: Python, imports, model): "
                  f"{startup_seconds(name, work, model_cfg, args):.1f} s")
        if not args.no_rss:
            rss_ratio(work, args)
    worst = max(redundancies, key=redundancies.get)
    print(f"infer_redundancy: {redundancies[worst]:.3f}  ({worst})")
    worst = min(ratios, key=ratios.get)
    print(f"infer_output_ratio: {ratios[worst]:.3f}  ({worst})")


if __name__ == "__main__":
    main()
