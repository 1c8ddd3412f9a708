"""Post-processing throughput: emmito's segment vs the original recipe, trace cost, memory of trace + upsample.

On one synthetic 200-slice heatmap block (mitochondria-like ellipsoids, some
touching, with noise) it times, in one run:

- the original EM-pipeline-mito recipe, re-implemented faithfully with scipy and
  skimage (per-slice Gaussian blur sigma 1 in float64, foreground > 16, scipy
  connected components, components < 1000 voxels removed, seeds = scipy label of
  heat > 150 with seeds < 100 voxels dropped, skimage watershed of the inverted
  heatmap inside the foreground over the whole block, uint16 output);
- ``emmito.decoders.segment_block`` with the schema defaults (the same numbers);
- the instance F1 at IoU 0.5 between the two outputs;
- tracing: matching this block's overlap slab with the next block's (the work
  per block boundary), and the whole in-memory trace of the two blocks;
- peak RSS of ``emmito trace`` + ``emmito upsample`` (separate subprocesses) on a
  label volume 4x deeper than a base one.

It prints ``segment_speedup``, ``segment_agreement_f1``, ``trace_fraction`` and
``postprocess_rss_ratio`` (the last line is ``segment_speedup: X``).

Run: .venv/bin/python benchmarks/segment_throughput.py [--slices 200] [--size 1024] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.morphology import remove_small_objects
from skimage.segmentation import watershed

from emmito import contract
from emmito.config import section_defaults
from emmito.decoders import segment_block
from emmito.io import create_volume
from emmito.metrics import instance_f1
from emmito.runtime import keep_freed_memory
from emmito.trace import match_overlap, trace_arrays

BLOCK_OVERLAP = 4


def synthetic_heat(depth: int, size: int, seed: int = 0, foreground_fraction: float = 0.06) -> np.ndarray:
    """uint8 (depth, size, size) heatmap: ellipsoids peaking near 240 at their centres, some touching, noise.

    Objects are elongated ellipsoids of random orientation in y/x (radii about
    3-12 slices in z, 8-30 px in y/x, like mitochondria at 40 x 8 x 8 nm or
    8 x 16 x 16 nm); a third of them get a partner placed against them, so the
    watershed has touching objects to split. Inside an object the heat rises
    from ~30 at its surface to ~240; background holds faint noise (0-6) and
    occasional weak false-positive blobs.
    """
    rng = np.random.default_rng(seed)
    heat = np.zeros((depth, size, size), np.float32)
    mean_volume = 4 / 3 * np.pi * 6 * 16 * 9
    n_objects = max(1, int(foreground_fraction * depth * size * size / mean_volume))
    placed = 0
    while placed < n_objects:
        radius = rng.uniform([3, 8, 5], [10, 30, 13])
        centre = rng.uniform([0, 0, 0], [depth, size, size])
        angle = rng.uniform(0, np.pi)
        bodies = [(centre, radius, angle)]
        if rng.random() < 0.33:  # a touching partner along the long axis
            shift = 1.8 * radius[1] * np.array([0, np.cos(angle), np.sin(angle)])
            bodies.append((centre + shift, radius * rng.uniform(0.7, 1.0, 3), angle + rng.uniform(-0.4, 0.4)))
        for c, r, a in bodies:
            lo = np.maximum(np.floor(c - r.max() * np.array([r[0] / r.max(), 1, 1])).astype(int), 0)
            hi = np.minimum(np.ceil(c + r.max() * np.array([r[0] / r.max(), 1, 1])).astype(int) + 1, heat.shape)
            if np.any(hi <= lo):
                continue
            z, y, x = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            dz, dy, dx = z - c[0], y - c[1], x - c[2]
            along = dy * np.cos(a) + dx * np.sin(a)
            across = -dy * np.sin(a) + dx * np.cos(a)
            distance = (dz / r[0]) ** 2 + (along / r[1]) ** 2 + (across / r[2]) ** 2
            value = np.where(distance < 1, 30 + 210 * (1 - distance), 0).astype(np.float32)
            view = heat[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
            np.maximum(view, value, out=view)
            placed += 1
    heat += rng.normal(0, 8, size=heat.shape).astype(np.float32) * (heat > 0)
    heat += rng.integers(0, 7, size=heat.shape, dtype=np.uint8)
    return np.clip(np.rint(heat), 0, 255).astype(np.uint8)


def original_recipe(heat_uint8: np.ndarray) -> np.ndarray:
    """The original EM-pipeline-mito segmentation of one block (scipy/skimage, float64), uint16 ids."""
    heat = heat_uint8.astype(np.float64)  # the merged block was a float array
    blurred = np.empty_like(heat)
    for z in range(heat.shape[0]):
        blurred[z] = ndimage.gaussian_filter(heat[z], sigma=1)
    foreground = blurred > 16
    components, _ = ndimage.label(foreground)
    components = remove_small_objects(components, max_size=999)  # removes < 1000
    seeds, _ = ndimage.label(heat > 150)
    seeds = remove_small_objects(seeds, max_size=99)  # removes < 100
    labels = watershed(-blurred, seeds, mask=components > 0)
    return labels.astype(np.uint16)


CPU_SECONDS: dict[str, float] = {}


def timed(function, *args, repeats: int = 1):
    """(result of the last run, best wall seconds over ``repeats`` runs); the CPU seconds of that run go to CPU_SECONDS.

    The previous run's result is dropped before each run, so that every run
    after the first works in memory the process already holds (as a process
    segmenting block after block does), whichever method it is.
    """
    best = float("inf")
    result = None
    for _ in range(repeats):
        result = None
        started, cpu_started = time.perf_counter(), time.process_time()
        result = function(*args)
        if time.perf_counter() - started < best:
            best = time.perf_counter() - started
            CPU_SECONDS[function.__name__] = time.process_time() - cpu_started
    return result, best


# ---- peak memory of trace + upsample ------------------------------------------------

# The child reports its own peak RSS. VmHWM, not ru_maxrss: Linux carries
# ru_maxrss over from the parent across fork + exec, so a child of a big parent
# would report the parent's peak.
CHILD = r"""
import sys
from emmito.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as status:
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print("maxrss_kb", peak_kb)
sys.exit(code)
"""


def write_label_blocks(folder: Path, n_blocks: int, block_slices: int, size: int, factor: int) -> list[Path]:
    """Seg blocks of a volume of ``n_blocks`` blocks: rods through every block + blobs, block-local ids."""
    depth = n_blocks * block_slices
    shape_yx = (size // factor, size // factor)
    rng = np.random.default_rng(1)
    pattern = np.zeros(shape_yx, np.uint32)
    for i in range(1, 200):
        y, x = rng.integers(0, shape_yx[0] - 6, 2)
        pattern[y : y + 5, x : x + 5] = i
    paths = []
    for b in range(n_blocks):
        start, stop = b * block_slices, min((b + 1) * block_slices + BLOCK_OVERLAP, depth)
        labels = np.broadcast_to(pattern, (stop - start, *shape_yx)).copy()
        labels[labels > 0] += 7 * b  # block-local ids differ from block to block
        path = folder / f"block_{b}.h5"
        attrs = {**contract.volume_frame(depth, factor), contract.CHANNELS: ["foreground"]}
        with create_volume(path, labels.shape, np.uint32, voxel_size=[40, 8 * factor, 8 * factor], offset=start, attrs=attrs) as ds:
            ds[...] = labels
        paths.append(path)
    with create_volume(folder / "image.h5", (depth, size, size), np.uint8, voxel_size=[40, 8, 8]) as ds:
        for z in range(0, depth, 8):
            ds[z : z + 8] = 0
    return paths


def peak_rss_mb(folder: Path, n_blocks: int, block_slices: int, size: int, factor: int) -> float:
    paths = write_label_blocks(folder, n_blocks, block_slices, size, factor)
    params = json.dumps({"merge": {"block_slices": block_slices, "block_overlap": BLOCK_OVERLAP}, "infer": {"chunk_slices": block_slices}})
    commands = [
        ["trace", str(folder / "seg_infer.h5"), str(folder / "trace.json"), *map(str, paths), "--params", params],
        ["upsample", str(folder / "seg_infer.h5"), str(folder / "image.h5"), str(folder / "seg.h5")],
    ]
    peak = 0.0
    for command in commands:
        result = subprocess.run([sys.executable, "-c", CHILD, *command], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"emmito {command[0]} failed:\n{result.stderr[-2000:]}")
        peak = max(peak, int(result.stdout.split("maxrss_kb")[-1]) / 1024)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=200, help="block slices (the block holds 4 more: its overlap)")
    parser.add_argument("--size", type=int, default=1024, help="slice height and width of the heatmap")
    parser.add_argument("--threads", type=int, default=2, help="segment.threads for emmito")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="time each method as the best of this many runs")
    parser.add_argument("--rss-size", type=int, default=1024, help="full-resolution slice size for the memory test (labels at half)")
    parser.add_argument("--skip-original", action="store_true", help="time emmito only (profiling)")
    args = parser.parse_args()

    block = args.slices + BLOCK_OVERLAP
    with tempfile.TemporaryDirectory(prefix="emmito-rss-") as tmp:
        base_dir, deep_dir = Path(tmp, "base"), Path(tmp, "deep")
        base_dir.mkdir()
        deep_dir.mkdir()
        base_mb = peak_rss_mb(base_dir, 2, 64, args.rss_size, 2)
        deep_mb = peak_rss_mb(deep_dir, 8, 64, args.rss_size, 2)
    print(f"peak RSS of trace + upsample: base (2 blocks of 64 slices) {base_mb:.0f} MB, 4x deeper {deep_mb:.0f} MB")

    # A volume of two blocks: block 0 holds its overlap, block 1 (the last) none.
    heat = synthetic_heat(2 * args.slices, args.size, args.seed)
    first, second = heat[:block], heat[args.slices :]
    voxels = first.size
    print(f"block: {first.shape} uint8, {voxels / 1e6:.0f} Mvoxels, foreground {np.mean(first > 16):.3f}")
    params = {**section_defaults("segment"), "threads": args.threads}

    # Both methods run in this process, so both get its memory reuse; each is
    # timed as the best of --repeats runs (the first pays for touching memory).
    keep_freed_memory()
    emmito_labels, emmito_seconds = timed(segment_block, first, params, repeats=args.repeats)
    print(f"emmito segment: {emmito_seconds:.2f} s ({voxels / 1e6 / emmito_seconds:.0f} MVx/s), {int(emmito_labels.max())} objects")
    if not args.skip_original:
        original_labels, original_seconds = timed(original_recipe, first, repeats=args.repeats)
        print(f"original recipe: {original_seconds:.2f} s ({voxels / 1e6 / original_seconds:.1f} MVx/s), "
              f"{len(np.unique(original_labels)) - 1} objects")
        agreement = instance_f1(emmito_labels, original_labels, 0.5)
        # CPU seconds (all threads) beside the wall time: on a shared machine the
        # wall time also holds other people's work.
        print(f"cpu seconds: original {CPU_SECONDS['original_recipe']:.2f}, emmito {CPU_SECONDS['segment_block']:.2f} "
              f"(ratio {CPU_SECONDS['original_recipe'] / CPU_SECONDS['segment_block']:.2f})")
        del original_labels

    second_labels = segment_block(second, params)
    tail, head = emmito_labels[args.slices :], second_labels[:BLOCK_OVERLAP]
    matches, match_seconds = timed(match_overlap, tail, head, "iou", 0.5, repeats=3)
    # trace_fraction: the work done per block boundary (matching the overlap slabs).
    trace_fraction = match_seconds / emmito_seconds
    # The whole trace stage, in memory, for two blocks: it also takes each block's
    # statistics and relabels it, work that grows with blocks, not boundaries.
    _, trace_seconds = timed(trace_arrays, [emmito_labels, second_labels], args.slices, BLOCK_OVERLAP, repeats=args.repeats)
    del second_labels
    print(f"trace: matching one boundary {match_seconds:.3f} s ({len(matches)} pairs); "
          f"whole trace of 2 blocks in memory {trace_seconds:.2f} s ({trace_seconds / 2 / emmito_seconds:.3f} of segment per block)")

    print(f"trace_fraction: {trace_fraction:.4f}")
    print(f"postprocess_rss_ratio: {deep_mb / base_mb:.3f}")
    if not args.skip_original:
        print(f"segment_agreement_f1: {agreement:.4f}")
        print(f"segment_speedup: {original_seconds / emmito_seconds:.2f}")


if __name__ == "__main__":
    main()
