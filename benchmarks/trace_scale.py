"""How the trace stage's cost grows with the number of label blocks (one trace job per volume).

For each block count (4, 8, 16, 32, 64 by default) it lays out, in a temporary
folder, the seg/block_{b}.h5 files of a synthetic volume of that many
200-slice blocks (256 x 256 slices by default), written with
``contract.fixture(..., "seg")``, the writer that makes files exactly as
``emmito segment`` does (uint32 block-local ids 1..n, Blosc-LZ4, the volume
frame; every block but the last holds ``merge.block_overlap`` slices of the
next). The objects are mitochondria-like capsules (radius 4-9 px, 20-300
slices long, drifting in y/x), placed in the volume's frame, so that many run
through one or more block boundaries and tracing has real matching to do.
Density: ``--objects`` capsules start per 200 slices per 256² of slice (scaled
with the slice area), about 7 % foreground (CDeep3M's masks: 8-9 %).

It then runs the real stage, ``emmito trace OUT ID_MAP BLOCK... --params ...``
(``emmito.cli.main``, as the trace rule does), in a child process per size,
and records:

- seconds: the child's wall time (interpreter start-up, imports and the stage);
- cpu: the child's user + system seconds (``os.wait4``: that child only);
- stage: wall seconds inside ``main()`` (the stage without the interpreter's
  start-up; it still imports the stage module and validates the params);
- peak RSS: the child's VmHWM (not ru_maxrss: Linux carries ru_maxrss over from
  the parent across fork + exec, and the parent holds the synthetic blocks);

and checks the traced object count against the objects that were placed. It
prints one line per size, a start-up line (a child that only imports the
stage), a straight-line fit of the stage's seconds (fixed + per block), and
the fitted growth exponents (log-log slopes of time against blocks; 1.0 is
linear). The last line is ``trace_growth_exponent: X`` (the stage's wall
seconds, over all sizes).

Run: .venv/bin/python benchmarks/trace_scale.py [--blocks 4 8 16 32 64] [--size 256] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import fastremap
import numpy as np

from emmito import contract

BLOCK_SLICES = 200
BLOCK_OVERLAP = 4  # merge.block_overlap's default
ANISOTROPY = 2.5  # z voxel over y/x voxel (40 x 16 x 16 nm)
VOXEL_SIZE = [40.0, 16.0, 16.0]

# The child runs the stage as the trace rule does and reports its own peak RSS
# (VmHWM) and the wall seconds inside main().
CHILD = r"""
import sys, time
from emmito.cli import main
started = time.perf_counter()
code = main(sys.argv[1:])
stage = time.perf_counter() - started
with open("/proc/self/status") as status:
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print("stage_seconds", stage, "maxrss_kb", peak_kb)
sys.exit(code)
"""
STARTUP = r"""
import emmito.cli, emmito.trace
with open("/proc/self/status") as status:
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print("stage_seconds", 0.0, "maxrss_kb", peak_kb)
"""


@dataclass(frozen=True)
class Capsules:
    """Segments p0 -> p1 (z, y, x voxels) with a radius in y/x voxels: the volume's objects."""

    p0: np.ndarray  # float64 (n, 3)
    p1: np.ndarray
    radius: np.ndarray  # float64 (n,)

    def z_range(self) -> tuple[np.ndarray, np.ndarray]:
        reach = self.radius / ANISOTROPY
        return np.minimum(self.p0[:, 0], self.p1[:, 0]) - reach, np.maximum(self.p0[:, 0], self.p1[:, 0]) + reach


def place_capsules(depth: int, size: int, per_block: int, seed: int) -> Capsules:
    """``per_block`` capsules start per 200 slices per 256² (scaled to ``size``), some before slice 0."""
    rng = np.random.default_rng(seed)
    n = max(1, round(per_block * depth / BLOCK_SLICES * (size / 256) ** 2))
    length = rng.uniform(20, 300, n)
    z0 = rng.uniform(-length / 2, depth, n)
    yx0 = rng.uniform(0, size, (n, 2))
    drift = rng.uniform(-30, 30, (n, 2))
    p0 = np.column_stack([z0, yx0])
    p1 = np.column_stack([z0 + length, yx0 + drift])
    return Capsules(p0, p1, rng.uniform(4, 9, n))


def rasterize(capsules: Capsules, start: int, stop: int, size: int) -> np.ndarray:
    """uint32 (stop - start, size, size) of slices [start, stop): global ids (capsule index + 1), first wins."""
    labels = np.zeros((stop - start, size, size), np.uint32)
    z_low, z_high = capsules.z_range()
    for i in np.flatnonzero((z_high >= start) & (z_low < stop)):
        p0, p1, r = capsules.p0[i], capsules.p1[i], capsules.radius[i]
        lo = np.floor(np.minimum(p0, p1) - [r / ANISOTROPY, r, r]).astype(int)
        hi = np.ceil(np.maximum(p0, p1) + [r / ANISOTROPY, r, r]).astype(int) + 1
        lo = np.maximum(lo, [start, 0, 0])
        hi = np.minimum(hi, [stop, size, size])
        if np.any(hi <= lo):
            continue
        z, y, x = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        scale = np.array([ANISOTROPY, 1.0, 1.0])
        v = (p1 - p0) * scale
        wz, wy, wx = (z - p0[0]) * ANISOTROPY, y - p0[1], x - p0[2]
        t = np.clip((wz * v[0] + wy * v[1] + wx * v[2]) / (v @ v), 0, 1)
        inside = (wz - t * v[0]) ** 2 + (wy - t * v[1]) ** 2 + (wx - t * v[2]) ** 2 <= r * r
        view = labels[lo[0] - start : hi[0] - start, lo[1] : hi[1], lo[2] : hi[2]]
        view[inside & (view == 0)] = i + 1
    return labels


def write_blocks(folder: Path, n_blocks: int, size: int, per_block: int, seed: int) -> tuple[list[Path], int, int]:
    """The seg blocks of an ``n_blocks``-block volume, as segment writes them; (paths, objects placed, raw bytes).

    Objects placed: the distinct global ids in the slices the blocks own (what a
    correct trace finds, convex capsules being cut only where another covers them).
    """
    depth = n_blocks * BLOCK_SLICES
    capsules = place_capsules(depth, size, per_block, seed)
    paths, placed, raw_bytes = [], set(), 0
    for b in range(n_blocks):
        start, stop = b * BLOCK_SLICES, min((b + 1) * BLOCK_SLICES + BLOCK_OVERLAP, depth)
        labels = rasterize(capsules, start, stop, size)
        placed.update(fastremap.unique(labels[:BLOCK_SLICES]).tolist())
        local, _ = fastremap.renumber(labels, in_place=True)  # block-local ids 1..n, as segment's
        path = contract.fixture(
            folder / "seg" / f"block_{b}.h5", "seg", local, voxel_size=VOXEL_SIZE, offset=start, volume_depth=depth
        )
        paths.append(path)
        raw_bytes += local.nbytes
    placed.discard(0)
    return paths, len(placed), raw_bytes


def run_child(code: str, arguments: list[str], folder: Path) -> dict[str, float]:
    """Run ``code`` in a fresh interpreter; its wall, CPU (user + system) and stage seconds and peak RSS."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "child.out", "w+") as out, open(folder / "child.err", "w+") as err:
        started = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", code, *arguments], stdout=out, stderr=err)
        # wait4, not Popen.wait: it also gives this child's own rusage (CPU seconds).
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        sys.exit(f"child failed ({child.returncode}):\n{stderr[-3000:]}")
    fields = stdout.split()
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "stage": float(fields[fields.index("stage_seconds") + 1]),
            "rss_mb": int(fields[fields.index("maxrss_kb") + 1]) / 1024}


def slope(x: list[float], y: list[float]) -> float:
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--size", type=int, default=256, help="slice height and width (inference resolution)")
    parser.add_argument("--objects", type=int, default=40, help="capsules starting per 200 slices per 256² of slice")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="write the blocks here and keep them (default: a temp dir)")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="emmito-trace-scale-"))
    params = json.dumps({"merge": {"block_slices": BLOCK_SLICES, "block_overlap": BLOCK_OVERLAP}, "trace": {}})
    rows = []
    try:
        base = run_child(STARTUP, [], root / "startup")
        print(f"blocks {BLOCK_SLICES}+{BLOCK_OVERLAP} x {args.size}² uint32; start-up (python + import emmito.trace): "
              f"{base['wall']:.2f} s wall, {base['cpu']:.2f} s cpu, {base['rss_mb']:.0f} MB RSS")
        for n_blocks in args.blocks:
            folder = root / f"blocks_{n_blocks}"
            t0 = time.perf_counter()
            paths, placed, raw_bytes = write_blocks(folder, n_blocks, args.size, args.objects, args.seed)
            made = time.perf_counter() - t0
            out, id_map = folder / "seg_infer.h5", folder / "trace.json"
            r = run_child(CHILD, ["trace", str(out), str(id_map), *map(str, paths), "--params", params], folder)
            record = json.loads(id_map.read_text())
            objects = len(record["objects"])
            crossing = sum(len(o["blocks"]) > 1 for o in record["objects"].values())
            blocks_bytes = sum(p.stat().st_size for p in paths)
            if objects != placed:
                print(f"  note: traced {objects} objects, {placed} placed (capsules cut in two by others)")
            rows.append((n_blocks, r, objects))
            print(f"blocks {n_blocks:4d}: seconds {r['wall']:7.2f}  cpu {r['cpu']:7.2f}  stage {r['stage']:7.2f}  "
                  f"seconds_per_block {r['stage'] / n_blocks:.3f}  peak_rss_mb {r['rss_mb']:6.0f}  "
                  f"objects {objects} ({crossing} across blocks)  trace.json {id_map.stat().st_size / 2**20:.2f} MiB  "
                  f"seg blocks {blocks_bytes / raw_bytes:.2%} of raw  (blocks made in {made:.0f} s)")
            if args.keep is None:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    blocks = [n for n, _, _ in rows]
    if len(blocks) < 2:
        return
    stage = [r["stage"] for _, r, _ in rows]
    upper = blocks.index(blocks[len(blocks) // 2])
    # The stage's own fixed cost (importing the stage, validating the params) flattens the
    # slope at few blocks: a straight line a + b * blocks separates it from the cost per block.
    per_block, fixed = np.polyfit(blocks, stage, 1)
    print(f"linear fit of the stage: {fixed:.2f} s + {per_block:.3f} s per block")
    print(f"growth exponent (log-log slope against blocks): wall {slope(blocks, [r['wall'] for _, r, _ in rows]):.3f}, "
          f"cpu {slope(blocks, [r['cpu'] for _, r, _ in rows]):.3f}, "
          f"peak RSS {slope(blocks, [r['rss_mb'] for _, r, _ in rows]):.3f}"
          + (f", stage over {blocks[upper]}-{blocks[-1]} blocks {slope(blocks[upper:], stage[upper:]):.3f}" if len(blocks) - upper > 1 else ""))
    print(f"trace_growth_exponent: {slope(blocks, stage):.3f}")


if __name__ == "__main__":
    main()
