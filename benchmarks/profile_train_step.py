"""Profile of one CPU training step: the top five ops by self CPU time, before and after the step's optimisations.

    .venv/bin/python benchmarks/profile_train_step.py [--config configs/cdeep3m.yaml] [--threads 1]
        [--warmup 3] [--repeats 12] [--profile-steps 2] [--before SPEC] [--after SPEC]

Builds the config's training run exactly as ``emmito train`` does (``train._Run``:
the model, ``losses.TrainingLoss``, AdamW with the warm-up/cosine schedule, gradient
clipping, on a synthetic volume from ``emmito.synth``), under the settings
``train_model`` runs CPU steps with (``train.threads`` replaced by ``--threads``,
torch's deterministic algorithms on), and steps it with ``_Run.step``. Two runs,
"before" and "after", start from the same seed, each in a process of its own with
a set of optimisations (SPEC: comma-separated names, "" for none):

  keep_memory    ``runtime.keep_freed_memory()``: freed memory stays in the heap,
                 so a step's tensors do not page-fault fresh pages in every step
  no_fill        deterministic mode without NaN-filling every new tensor
                 (torch.utils.deterministic.fill_uninitialized_memory = False)
  ohem_cut       ``losses.ohem_threshold``: no k-th value selection where at least
                 k voxels are below the threshold (the cut is then the threshold);
                 without it, the one before issue 19 (kthvalue every call)
  ohem_sum       ``losses.ohem_bce``: a masked sum over the kept voxels; without
                 it, the one before issue 19 (gathered by a boolean index)
  channels_last  model and batch in torch.channels_last_3d
  compile        torch.compile (inductor) of the network's forward_with_aux
  compile_loss   torch.compile of the loss (``losses.TrainingLoss``)
  fused          AdamW(fused=True);  foreach: AdamW(foreach=True)
  bilinear       trilinear interpolation that keeps z run as bilinear per slice
                 (``bilinear_interpolate``; tried, not in the code)

Both take ``--warmup`` untimed steps (a compiled run's include its compile time:
``compile_s``, their time less as many median steps), then ``--repeats`` timed
steps and ``--profile-steps`` profiled ones (torch.profiler, CPU, record_shapes
off), in turns (before, after, after, before, ...: one process steps while the
other waits) on the same batches, so that both see the same load on a shared
machine. Prints each run's top five ops (self CPU ms per step, % of the profiled
self CPU time); the median step times and each process's peak memory; the largest
relative difference of the two runs' gradients after their first step (the same
weights and batch) and of their losses, and the largest difference of their
weights after the same steps (float rounding where the optimisations are exact:
AdamW turns a rounding-sized gradient difference into up to one learning rate per
step); ``cpu_time_speedup``; and last ``step_speedup: X``, the median over the
repeats of before's wall-clock step time over after's (a repeat's two steps run
back to back, under the same load). ``cpu_time_speedup`` is the same ratio of the
steps' CPU times (user + system), which other load on the machine disturbs less.

Measured on 2 shared cores, 1 thread (issue 19): keep_memory 7-10 % of a step (it
was 30-40 thousand page faults and 90-110 ms of system time per step), no_fill
2-5 %, ohem_cut + ohem_sum 2-4 % (the OHEM-BCE calls 3-4x cheaper while the
threshold is the cut, early in training; 15 % cheaper, under 1 % of a step, once
the k-th value is), all four 1.11-1.14x, with the same weights bit for bit. Not
kept: channels_last 0.87-0.93x (the convolutions gain 15-20 %, GroupNorm's and
ReLU's backward and the layout copies lose more), compile 0.72-0.97x after 80-110 s
of compiling (a deterministic index_put in the compiled backward), fused and
foreach within noise (AdamW is 0.3 % of a step), bilinear 0.98-1.03x.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from emmito import config as config_module  # noqa: E402
from emmito import losses, runtime  # noqa: E402
from emmito.prediction import DEFAULT_INPUT_NORM  # noqa: E402
from emmito.resampling import pool_pair  # noqa: E402
from emmito.synth import synthesize  # noqa: E402
from emmito.train import _Run, training_setup  # noqa: E402

OPTIMISATIONS = (
    "keep_memory", "no_fill", "ohem_cut", "ohem_sum", "channels_last", "compile", "compile_loss", "fused", "foreach", "bilinear",
)
DEFAULT_AFTER = "keep_memory,no_fill,ohem_cut,ohem_sum"
TOP = 5


# ---- the reference code (before issue 19), for the "before" run, and a candidate not kept -------


def reference_ohem_threshold(probability_of_truth: torch.Tensor, threshold: float, min_kept: int) -> torch.Tensor:
    """What ``losses.ohem_threshold`` replaced: the k-th smallest value selected on every call."""
    flat = probability_of_truth.flatten()
    k = max(1, min(int(min_kept), flat.numel()))
    return torch.maximum(torch.kthvalue(flat, k).values, torch.tensor(threshold, dtype=flat.dtype, device=flat.device))


def reference_ohem_bce(
    logits: torch.Tensor, target: torch.Tensor, threshold: float, keep_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What ``losses.ohem_bce`` replaced: the kept voxels' BCE gathered by a boolean index (the cut: ``losses.ohem_threshold``)."""
    probability = torch.sigmoid(logits)
    probability_of_truth = torch.where(target > 0.5, probability, 1.0 - probability).detach()
    cut = losses.ohem_threshold(probability_of_truth, threshold, losses.kept_count(probability_of_truth.numel(), keep_fraction))
    keep = probability_of_truth <= cut
    per_voxel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    kept = int(keep.sum())
    return per_voxel[keep].sum() / max(kept, 1), cut, kept


TORCH_INTERPOLATE = F.interpolate


def bilinear_interpolate(x: torch.Tensor, size=None, scale_factor=None, mode: str = "nearest", **kwargs) -> torch.Tensor:
    """Trilinear interpolation of (batch, channel, z, y, x) that keeps z as bilinear per slice (the same values up to rounding)."""
    same_depth = size[0] == x.shape[2] if size is not None else scale_factor is not None and scale_factor[0] == 1
    if mode != "trilinear" or x.ndim != 5 or not same_depth or kwargs:
        return TORCH_INTERPOLATE(x, size=size, scale_factor=scale_factor, mode=mode, **kwargs)
    batch, channels, depth, height, width = x.shape
    planes = x.reshape(batch, channels * depth, height, width)
    if size is not None:
        out = TORCH_INTERPOLATE(planes, size=tuple(size[1:]), mode="bilinear")
    else:
        out = TORCH_INTERPOLATE(planes, scale_factor=tuple(scale_factor[1:]), mode="bilinear")
    return out.reshape(batch, channels, depth, *out.shape[2:])


# Code an optimisation replaced: (its name, module, function's name, the reference), put back without it.
REFERENCE = (("ohem_cut", losses, "ohem_threshold", reference_ohem_threshold), ("ohem_sum", losses, "ohem_bce", reference_ohem_bce))
# Candidates not in the code: (name, module, function's name, the candidate), put in with it.
CANDIDATES = (("bilinear", torch.nn.functional, "interpolate", bilinear_interpolate),)


# ---- one run with a set of optimisations, in a process of its own ------------------------------


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Variant:
    """A training run (``train._Run``, from ``args.seed``) with the optimisations ``names``; this process's settings set for it."""

    def __init__(self, names: frozenset[str], args: argparse.Namespace):
        self.names = names
        if "keep_memory" in names:
            runtime.keep_freed_memory()
        torch.set_num_threads(args.threads)
        torch.use_deterministic_algorithms(True)  # as train_model on CPU
        torch.utils.deterministic.fill_uninitialized_memory = "no_fill" not in names
        for name, module, attribute, function in REFERENCE:
            if name not in names:
                setattr(module, attribute, function)
        for name, module, attribute, function in CANDIDATES:
            if name in names:
                setattr(module, attribute, function)
        params = config_module.load(args.config)
        params["train"].update(threads=args.threads, workers=0)
        patch, factor = params["model"]["patch"], params["model"]["downsample_xy"]
        image, label = synthesize(max(2 * patch[0], 8), max(256, max(patch[1:]) * factor), seed=args.seed)
        optimizer = torch.optim.AdamW
        extra = {"fused": True} if "fused" in names else {"foreach": True} if "foreach" in names else {}
        # The optimiser as train.py builds it, with the one keyword more.
        torch.optim.AdamW = lambda *a, **k: optimizer(*a, **k, **extra)
        torch.manual_seed(args.seed)
        try:
            self.run = _Run([pool_pair(image, label, factor)], params, training_setup(params), torch.device("cpu"))
        finally:
            torch.optim.AdamW = optimizer
        source = self.run.batches(dict(DEFAULT_INPUT_NORM), 1, min(4, self.run.total))  # iterations 1-4's, as the loop draws them
        self.batches = [source[index] for index in range(len(source))]
        self.memory_format = torch.channels_last_3d if "channels_last" in names else torch.contiguous_format
        if "channels_last" in names:
            self.run.model.to(memory_format=torch.channels_last_3d)
        if "compile" in names:
            self.run.model.forward_with_aux = torch.compile(self.run.model.forward_with_aux)
        if "compile_loss" in names:
            self.run.loss = torch.compile(self.run.loss)

    def step(self, iteration: int) -> tuple[float, float, float]:
        """One training step as ``train._train_loop`` runs it (step, then the schedule): (seconds, CPU seconds, loss)."""
        inputs, targets = self.batches[iteration % len(self.batches)]
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        _, parts = self.run.step(inputs.contiguous(memory_format=self.memory_format), targets.contiguous(memory_format=self.memory_format))
        self.run.schedule(iteration, 0.0)
        return time.perf_counter() - started, _cpu_seconds() - cpu_started, float(parts.loss.detach())

    def profiled_step(self, iteration: int) -> dict[str, float]:
        """One step under torch.profiler (CPU, record_shapes off): each op's self CPU microseconds."""
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            self.step(iteration)
        return {event.key: event.self_cpu_time_total for event in prof.key_averages()}


def serve(connection: Connection, names: frozenset[str], args: argparse.Namespace) -> None:
    """A run's process: build it, then answer (command, iteration) until "stop"."""
    variant = Variant(names, args)
    connection.send("ready")
    while True:
        command, iteration = connection.recv()
        if command == "stop":
            return
        if command == "step":
            connection.send(variant.step(iteration))
        elif command == "profile":
            connection.send(variant.profiled_step(iteration))
        elif command == "gradients":
            connection.send([p.grad.clone() if p.grad is not None else None for p in variant.run.model.parameters()])
        elif command == "weights":
            connection.send(variant.run.model.state_dict())
        elif command == "peak_memory":
            connection.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MB


class Remote:
    """The parent's handle on one run's process."""

    def __init__(self, label: str, names: frozenset[str], args: argparse.Namespace):
        self.label, self.names = label, names
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=serve, args=(child, names, args), daemon=True)
        self.process.start()
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []
        self.warmup_s = 0.0

    def ready(self) -> None:
        if self.connection.recv() != "ready":
            raise RuntimeError(f"{self.label}: the run did not start")

    def ask(self, command: str, iteration: int = 0) -> Any:
        self.connection.send((command, iteration))
        return self.connection.recv()

    def step(self, iteration: int, timed: bool) -> None:
        seconds, cpu_seconds, loss = self.ask("step", iteration)
        self.losses.append(loss)
        if timed:
            self.times.append(seconds)
            self.cpu_times.append(cpu_seconds)
        else:
            self.warmup_s += seconds

    def stop(self) -> None:
        self.connection.send(("stop", 0))
        self.process.join(timeout=60)


# ---- the report ---------------------------------------------------------------------------------


def top_ops(totals: dict[str, float], steps: int) -> tuple[list[tuple[str, float, float]], float]:
    """(the ``TOP`` ops by self CPU time: (name, self CPU ms per step, % of the profiled self CPU), self CPU ms per step)."""
    total = sum(totals.values())
    ranked = sorted(totals.items(), key=lambda item: item[1], reverse=True)[:TOP]
    return [(name, us / 1e3 / steps, 100.0 * us / total) for name, us in ranked], total / 1e3 / steps


def print_table(remote: Remote, totals: dict[str, float], steps: int) -> None:
    rows, per_step = top_ops(totals, steps)
    names = ",".join(sorted(remote.names)) or "none"
    median = statistics.median(remote.times) * 1e3
    print(f"\n{remote.label} ({names}): step {median:.1f} ms (median), profiled self CPU {per_step:.1f} ms/step")
    print(f"  {'op':<44} {'self CPU ms/step':>16} {'% of step':>10}")
    for name, ms, share in rows:
        print(f"  {name[:44]:<44} {ms:>16.1f} {share:>9.1f}%")


def relative_difference(first: list[torch.Tensor | None], second: list[torch.Tensor | None]) -> float:
    """The largest |difference| of two lists of tensors, relative to the largest |value| of the same tensor."""
    worst = 0.0
    for a, b in zip(first, second):
        if a is not None and b is not None:
            worst = max(worst, float((a - b).abs().max()) / max(float(a.abs().max()), 1e-30))
    return worst


def parse_spec(spec: str) -> frozenset[str]:
    names = frozenset(name.strip() for name in spec.split(",") if name.strip())
    unknown = names - set(OPTIMISATIONS)
    if unknown or {"fused", "foreach"} <= names:
        raise SystemExit(f"unknown or conflicting optimisations {sorted(unknown) or ['fused', 'foreach']}: choose from {OPTIMISATIONS}")
    return names


def measure(remotes: list[Remote], args: argparse.Namespace) -> tuple[float, list[dict[str, float]]]:
    """Warm-up, timed and profiled steps of both runs in turns: (first step's gradient difference, each run's profile totals)."""
    gradient_diff = 0.0
    for iteration in range(args.warmup):
        for remote in remotes:
            remote.step(iteration, timed=False)
        if iteration == 0:
            # One step from the same weights on the same batch: the gradients must agree up to rounding.
            gradient_diff = relative_difference(*(remote.ask("gradients") for remote in remotes))
    totals: list[dict[str, float]] = [{}, {}]
    for repeat in range(args.repeats + args.profile_steps):
        iteration = args.warmup + repeat
        for index in [0, 1] if repeat % 2 == 0 else [1, 0]:
            if repeat < args.repeats:
                remotes[index].step(iteration, timed=True)
            else:
                for key, value in remotes[index].ask("profile", iteration).items():
                    totals[index][key] = totals[index].get(key, 0.0) + value
    return gradient_diff, totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cdeep3m.yaml")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (train.threads)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each run first (at least 1)")
    parser.add_argument("--repeats", type=int, default=12, help="timed steps of each run, in turns")
    parser.add_argument("--profile-steps", type=int, default=2, help="profiled steps of each run, in turns")
    parser.add_argument("--before", default="", help=f"optimisations of the 'before' run, of {','.join(OPTIMISATIONS)}")
    parser.add_argument("--after", default=DEFAULT_AFTER, help="optimisations of the 'after' run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.warmup = max(1, args.warmup)

    remotes = [Remote(label, parse_spec(spec), args) for label, spec in (("before", args.before), ("after", args.after))]
    try:
        for remote in remotes:
            remote.ready()
        gradient_diff, totals = measure(remotes, args)
        weights = [remote.ask("weights") for remote in remotes]
        peaks = [remote.ask("peak_memory") for remote in remotes]
    finally:
        for remote in remotes:
            remote.stop()
    for remote, total in zip(remotes, totals):
        print_table(remote, total, args.profile_steps)

    before, after = remotes
    loss_diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(before.losses, after.losses))
    assert weights[0].keys() == weights[1].keys()
    weight_diff = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0] if weights[0][k].is_floating_point())
    print(f"\nthreads: {args.threads}; {args.repeats} steps each, in turns, after {args.warmup} warm-up steps")
    for remote, peak in zip(remotes, peaks):
        median = statistics.median(remote.times)
        extra = f", compile_s: {remote.warmup_s - args.warmup * median:.1f}" if remote.names & {"compile", "compile_loss"} else ""
        print(
            f"{remote.label}_step_ms: {median * 1e3:.1f} (min {min(remote.times) * 1e3:.1f}, max {max(remote.times) * 1e3:.1f}; "
            f"CPU time {statistics.median(remote.cpu_times) * 1e3:.1f}; peak memory {peak:.0f} MB){extra}"
        )
    print(f"first_step_max_grad_rel_diff: {gradient_diff:.2e}")
    print(f"max_loss_rel_diff: {loss_diff:.2e} over {len(before.losses)} steps; max_weight_abs_diff: {weight_diff:.2e}")
    # Each repeat's two steps ran back to back, under the same load: the median of their ratios.
    print(f"cpu_time_speedup: {statistics.median(a / b for a, b in zip(before.cpu_times, after.cpu_times)):.3f}")
    print(f"step_speedup: {statistics.median(a / b for a, b in zip(before.times, after.times)):.3f}")


if __name__ == "__main__":
    main()
