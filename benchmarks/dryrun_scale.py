"""What planning costs as volumes grow: emmito's dry run against a bare Snakefile of the same jobs.

Each cluster job parses the Snakefile again, and the scheduler plans every job of
the volume, so parse-time work must not grow with the slice count. For each
``--slices`` value this script lays out a throwaway project in a temporary folder
(the repository's Snakefile, rules/ and envs/; a volume of that many tiny PNG
slices: only names and one header are read at parse time; a small labelled
volume to train on; chunk 20 / block 200) and then, in the same run:

1. asks emmito for its job graph (``snakemake --dag``) and writes a **bare
   Snakefile** from it: one rule per emmito rule, the same jobs with the same
   dependencies, each job one ``touch``, no config, no input functions, no params;
2. times ``snakemake -n`` of emmito and of the bare Snakefile, both planning every
   job of the volume (the bare one checked to plan the same jobs per rule);
3. at the largest size, times one dry run of a single chunk's target
   (``results/big/heat/job_7``: what a cluster job's start-up plans).

It prints, per size:

    dryrun_jobs: N (bare: N)            jobs planned by emmito and by the bare Snakefile
    dryrun_seconds: X (bare: Y)         wall
    dryrun_cpu_seconds: X (bare: Y)     user + system of the snakemake process
    dryrun_ratio: X/Y                   emmito's wall time / the bare one's
    dryrun_cpu_ratio: X/Y

and once: ``job_parse_seconds`` (user + system CPU seconds of the single-chunk dry run).

Start SLURM first where slurm-client is installed (``sudo tests/slurm/start-slurm.sh``):
without a controller every snakemake start waits ~9 s on ``scontrol`` (the executor
plugin probes it at import), which would add the same 9 s to both sides.

Run: .venv/bin/python benchmarks/dryrun_scale.py [--slices 10000 100000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
CHUNK_TARGET_JOB = 7

BARE_SNAKEFILE = '''# A bare Snakefile: emmito's jobs and dependencies (bare_dag.json), nothing else.
import json

GRAPH = json.load(open("bare_dag.json"))
RULE = GRAPH["rule"]
DEPS = GRAPH["deps"]


wildcard_constraints:
    node=r"\\d+",


def deps(wildcards):
    return [f"bare/{RULE[d]}/{d}.done" for d in DEPS[wildcards.node]]


rule all:
    input:
        [f"bare/{RULE[d]}/{d}.done" for d in DEPS[GRAPH["root"]]],

'''

BARE_RULE = '''
rule {name}:
    input:
        deps,
    output:
        "bare/{name}/{{node}}.done",
    shell:
        "touch {{output}}"

'''


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


def run(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float, float]:
    """(the finished snakemake, wall seconds, user + system CPU seconds of it and its children)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"snakemake {' '.join(args)} in {cwd} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def job_stats(output: str) -> Counter:
    """{rule: jobs} from a dry run's job stats table."""
    table = output.split("Job stats:", 1)[1]
    counts = Counter()
    for line in table.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        counts[parts[0]] = int(parts[1])
    return counts


def bare_from_dag(dot: str, dest: Path) -> None:
    """Write the bare Snakefile and its bare_dag.json (rule per job, dependencies per job) from ``snakemake --dag``."""
    rule = {node: label.split("\\n")[0] for node, label in re.findall(r'^\s*(\d+)\[label = "([^"]*)"', dot, re.M)}
    deps: dict[str, list[str]] = {node: [] for node in rule}
    for source, target in re.findall(r"^\s*(\d+) -> (\d+)", dot, re.M):
        deps[target].append(source)
    root = next(node for node, name in rule.items() if name == "all")
    (dest / "bare_dag.json").write_text(json.dumps({"rule": rule, "deps": deps, "root": root}))
    names = sorted(set(rule.values()) - {"all"})
    (dest / "Snakefile").write_text(BARE_SNAKEFILE + "".join(BARE_RULE.format(name=n) for n in names))


def measure(root: Path, n_slices: int, args: argparse.Namespace, chunk_target: bool) -> None:
    project, bare = root / f"emmito-{n_slices}", root / f"bare-{n_slices}"
    project.mkdir(parents=True)
    bare.mkdir(parents=True)
    make_project(project, n_slices, args.size, args.chunk_slices, args.block_slices)
    dag, _, _ = run(["--dag", "--cores", "2"], project)
    bare_from_dag(dag.stdout, bare)
    # .snakemake/emmito-parse-cache now holds the listing and the validated config: what every
    # later parse (every cluster job) finds, so the timed runs below find it too
    emmito, wall, cpu = run(["-n", "--cores", "2"], project)
    plain, bare_wall, bare_cpu = run(["-n", "--cores", "2"], bare)
    ours, theirs = job_stats(emmito.stdout), job_stats(plain.stdout)
    if ours != theirs:
        sys.exit(f"the bare Snakefile plans other jobs than emmito: {dict(ours - theirs)} / {dict(theirs - ours)}")
    n_chunks, n_blocks = -(-n_slices // args.chunk_slices), -(-n_slices // args.block_slices)
    print(f"slices: {n_slices}  chunks: {n_chunks}  blocks: {n_blocks}  infer jobs: {ours['infer']}  merge: {ours['merge']}")
    print(f"dryrun_jobs: {sum(ours.values())} (bare: {sum(theirs.values())})")
    print(f"dryrun_seconds: {wall:.2f} (bare: {bare_wall:.2f})")
    print(f"dryrun_cpu_seconds: {cpu:.2f} (bare: {bare_cpu:.2f})")
    print(f"dryrun_ratio: {wall / bare_wall:.2f}")
    print(f"dryrun_cpu_ratio: {cpu / bare_cpu:.2f}")
    if chunk_target:
        _, chunk_wall, chunk_cpu = run(["-n", "--cores", "2", f"results/big/heat/job_{CHUNK_TARGET_JOB}"], project)
        # the same job in the bare Snakefile: Snakemake's own start-up and planning, the floor
        graph = json.loads((bare / "bare_dag.json").read_text())
        node = sorted((n for n, r in graph["rule"].items() if r == "infer"), key=int)[CHUNK_TARGET_JOB]
        _, bare_chunk_wall, bare_chunk_cpu = run(["-n", "--cores", "2", f"bare/infer/{node}.done"], bare)
        print(f"job_parse_seconds: {chunk_cpu:.2f} (bare: {bare_chunk_cpu:.2f})  CPU, user + system, of a dry run of "
              f"results/big/heat/job_{CHUNK_TARGET_JOB} at {n_slices} slices (wall {chunk_wall:.2f} s, bare {bare_chunk_wall:.2f} s)")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--size", type=int, default=8, help="slice height and width in pixels")
    parser.add_argument("--chunk-slices", type=int, default=20)
    parser.add_argument("--block-slices", type=int, default=200)
    parser.add_argument("--keep", type=Path, help="lay the projects out here and keep them (default: a temp dir)")
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="emmito-dryrun-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for n_slices in args.slices:
            measure(root, n_slices, args, chunk_target=n_slices == max(args.slices))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
