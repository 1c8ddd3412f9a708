"""How long ``snakemake -n`` takes to plan a 10,000-slice volume (500 chunks, 50 blocks).

Each cluster job parses the Snakefile again, so parse-time work must stay
cheap. This script lays out a throwaway project in a temporary folder: the
repository's Snakefile, rules/ and envs/, a volume of ``--slices`` tiny PNG
slices (8 x 8 by default: only their names and one header are read at parse
time), a small labelled volume for training (the dry run plans train too),
and a config with chunk 20 / block 200. It prints the dry run's wall time:

    dryrun_cpu_seconds: X
    dryrun_seconds: X   (wall)

Run: .venv/bin/python benchmarks/dryrun_scale.py [--slices 10000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def write_slices(folder: Path, n_slices: int, size: int, binary: bool = False) -> None:
    """Write ``n_slices`` PNG slices of ``size`` x ``size`` (the same bytes each time: only names matter)."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((size, size), np.uint8)
    pixels[size // 4 : size // 2, size // 4 : size // 2] = 255 if binary else 128
    first = folder / "slice_00000.png"
    Image.fromarray(pixels).save(first)
    data = first.read_bytes()
    for i in range(1, n_slices):
        (folder / f"slice_{i:05d}.png").write_bytes(data)


def make_project(dest: Path, n_slices: int, size: int, chunk_slices: int, block_slices: int) -> None:
    shutil.copy2(REPO / "Snakefile", dest / "Snakefile")
    for folder in ("rules", "envs"):
        shutil.copytree(REPO / folder, dest / folder)
    write_slices(dest / "data" / "big" / "images", n_slices, size)
    write_slices(dest / "data" / "train" / "images", 8, size)
    write_slices(dest / "data" / "train" / "labels", 8, size, binary=True)
    config = {
        "volumes": {
            "big": {"images": "data/big/images"},
            "train": {"images": "data/train/images", "labels": "data/train/labels"},
        },
        "train": {"volumes": ["train"]},
        "infer": {"volumes": ["big"], "chunk_slices": chunk_slices},
        "merge": {"block_slices": block_slices, "block_overlap": 4},
    }
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=8, help="slice height and width in pixels")
    parser.add_argument("--chunk-slices", type=int, default=20)
    parser.add_argument("--block-slices", type=int, default=200)
    parser.add_argument("--keep", type=Path, help="lay the project out here and keep it (default: a temp dir)")
    args = parser.parse_args()

    dest = args.keep or Path(tempfile.mkdtemp(prefix="emmito-dryrun-"))
    dest.mkdir(parents=True, exist_ok=True)
    try:
        make_project(dest, args.slices, args.size, args.chunk_slices, args.block_slices)
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run(
            [SNAKEMAKE, "-n", "--cores", "2", "--quiet", "rules"], cwd=dest, env=env, capture_output=True, text=True
        )
        seconds = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        if result.returncode != 0:
            sys.exit(f"snakemake -n failed ({result.returncode}):\n{result.stderr[-3000:]}")
        n_chunks = -(-args.slices // args.chunk_slices)
        n_blocks = -(-args.slices // args.block_slices)
        jobs = next((line.split()[-1] for line in result.stdout.splitlines() if line.startswith("total")), "?")
        print(f"jobs planned: {jobs}")
        print(f"slices: {args.slices}  chunks: {n_chunks}  blocks: {n_blocks}")
        # CPU seconds too: on a shared machine the wall time also counts other people's work.
        print(f"dryrun_cpu_seconds: {cpu_seconds:.2f}")
        print(f"dryrun_seconds: {seconds:.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    main()
