"""Training throughput: does the network wait for its batches? ``train_overhead_ratio`` = ready-made step / full step.

    .venv/bin/python benchmarks/train_throughput.py [--config configs/cdeep3m.yaml] [--steps 50] [--rounds 5]
        [--warmup 3] [--workers 1] [--threads 1] [--no-inline]

With the config's model and train sections (patch, batch size, target, loss,
augment_kinds: the cdeep3m config's include elastic) on a synthetic volume
(``emmito.synth``, ``--slices`` x ``--size``^2 at full resolution, pooled as the
config says), on CUDA where present (AMP on), else on the CPU with ``--threads``
torch threads, it measures:

(a) forward + backward + optimiser step on ready-made batches: ``_Run.step``,
    the very step the training loop runs, set up as ``train_model`` sets it up,
    on batches assembled before the clock starts (the ones the loop would draw);
(b) the full training step: ``train_model``'s loop with ``--workers`` loader
    workers (``train.workers``), the time between consecutive iterations of its
    log (waiting for the batch, copying it to the device, the step, the
    schedule, the log line), no validation;
(c) unless ``--no-inline``: (b) with workers 0, the loop making each batch itself.

``--steps`` steady-state steps of each in all, in ``--rounds`` rounds of
(a), (b), (c) one after the other (each after ``--warmup`` untimed steps of its
own), so that a machine whose load drifts weighs on all three alike.
``train_overhead_ratio`` = mean (a) / mean (b): 1 when the network never waits.
``in_loop_overhead_ratio``: the step's own time inside (b)'s loop over (b), the
same iterations (the loader's workers running beside it). On a 2-core CPU the
default is 1 torch thread + 1 worker, one core each.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from emmito import config as config_module  # noqa: E402
from emmito.prediction import DEFAULT_INPUT_NORM  # noqa: E402
from emmito.resampling import pool_pair  # noqa: E402
from emmito.runtime import keep_freed_memory, pick_device, thread_count  # noqa: E402
from emmito.synth import synthesize  # noqa: E402
from emmito.train import _Run, train_model, training_setup  # noqa: E402


STEP = _Run.step  # the loop's step, also while full_step_seconds times it


def _timed_step(run: _Run, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[float, tuple]:
    started = time.perf_counter()
    result = STEP(run, inputs, targets)
    float(result[1].loss.detach())  # the loop's log line reads the loss: on CUDA, the step's end
    return time.perf_counter() - started, result


def ready_made_step_seconds(volume: tuple, params: dict, device: torch.device, warmup: int, steps: int) -> list[float]:
    """(a): seconds of each steady-state ``_Run.step`` on pre-assembled batches, set up as ``train_model`` sets a run up."""
    setup = training_setup(params)
    torch.set_num_threads(thread_count(params["train"]["threads"]))
    torch.manual_seed(params["seed"])
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    if device.type == "cpu":  # as train_model sets it
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        run = _Run([pool_pair(*volume, setup.factor)], params, setup, device)
        batches = run.batches(dict(DEFAULT_INPUT_NORM), run.first, run.total)
        ready = [tuple(t.to(device) for t in batches[position]) for position in range(warmup + steps)]
        seconds = [_timed_step(run, inputs, targets)[0] for inputs, targets in ready]
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        torch.utils.deterministic.fill_uninitialized_memory = fill_before
    return seconds[warmup:]


def full_step_seconds(
    volume: tuple, params: dict, device: torch.device, warmup: int, workers: int
) -> tuple[list[float], list[float]]:
    """(b): (seconds between consecutive steady-state iterations of ``train_model``'s loop with ``workers`` loader
    workers, the seconds of the step itself in each of those iterations)."""
    params = {**params, "train": {**params["train"], "workers": workers}}
    step_seconds = []

    def timed(run: _Run, inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
        seconds, result = _timed_step(run, inputs, targets)
        step_seconds.append(seconds)
        return result

    _Run.step = timed
    try:
        _, metrics = train_model([volume], [], params, device=device, progress=False)
    finally:
        _Run.step = STEP
    ends = [m["seconds"] for m in metrics]  # since the loop began, at each iteration's end
    return [b - a for a, b in zip(ends[warmup - 1 :], ends[warmup:])], step_seconds[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cdeep3m.yaml")
    parser.add_argument("--steps", type=int, default=50, help="timed steady-state steps of each measurement, in all")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the steps are split into, interleaving the measurements")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each round's measurement (at least 1)")
    parser.add_argument("--workers", type=int, default=1, help="train.workers of the full step (b)")
    parser.add_argument("--threads", type=int, default=1, help="train.threads: torch's CPU threads")
    parser.add_argument("--slices", type=int, default=20, help="synthetic volume depth (the CDeep3M training stack's)")
    parser.add_argument("--size", type=int, default=512, help="synthetic volume side (y, x) at full resolution")
    parser.add_argument("--no-inline", action="store_true", help="skip (c), the full step with workers 0")
    args = parser.parse_args()
    keep_freed_memory()  # as the train CLI does
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be at least 1")

    per_round = math.ceil(args.steps / args.rounds)
    params = config_module.load(args.config)
    patch, train_cfg = params["model"]["patch"], params["train"]
    train_cfg.update(
        iterations=args.warmup + per_round, threads=args.threads, max_minutes=0, val_every=10**9, save_every=10**9,
    )
    image, label = synthesize(max(args.slices, patch[0]), args.size, seed=0)
    volume = (image, label)
    device = pick_device()

    ready, full, in_loop, inline = [], [], [], []
    for _ in range(args.rounds):
        ready += ready_made_step_seconds(volume, params, device, args.warmup, per_round)
        loop_seconds, step_seconds = full_step_seconds(volume, params, device, args.warmup, args.workers)
        full += loop_seconds
        in_loop += step_seconds
        if not args.no_inline:
            inline += full_step_seconds(volume, params, device, args.warmup, 0)[0]

    batch = train_cfg["batch_size"]
    hardware = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device: {device} ({hardware}), torch threads: {args.threads}, loader workers: {args.workers}")
    print(
        f"config: {args.config.name}, patch {patch}, batch {batch}, target {params['model']['target']}, "
        f"augment_kinds {train_cfg['augment_kinds']} (p {train_cfg['augment_probability']}); "
        f"volume {image.shape[0]}x{args.size}x{args.size}, downsample_xy {params['model']['downsample_xy']}"
    )
    print(f"iterations: {args.rounds} rounds x ({args.warmup} warm-up + {per_round} timed), each measurement")

    def line(name: str, seconds: list[float]) -> str:
        return f"{name}: {statistics.fmean(seconds):.4f} s/step (median {statistics.median(seconds):.4f}, {len(seconds)} steps)"

    print(line("ready_made_step", ready))
    print(line(f"full_step_workers_{args.workers}", full))
    print(line(f"step_inside_loop_workers_{args.workers}", in_loop))
    if inline:
        print(line("full_step_workers_0", inline))
        print(f"inline_overhead_ratio: {statistics.fmean(ready) / statistics.fmean(inline):.3f}  (workers 0, for comparison)")
    print(f"train_samples_per_s: {batch / statistics.fmean(full):.3f}")
    print(f"in_loop_overhead_ratio: {statistics.fmean(in_loop) / statistics.fmean(full):.3f}")
    print(f"train_overhead_ratio: {statistics.fmean(ready) / statistics.fmean(full):.3f}")


if __name__ == "__main__":
    main()
