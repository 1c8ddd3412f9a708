"""A tiny, complete emmito project in a folder: the workflow files plus synthetic data.

Used by the workflow, SLURM and crash tests. It copies what a user's clone has
(Snakefile, rules/, envs/, profiles/) and writes a config for a tiny volume, so
the real workflow runs in seconds.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EMMITO = str(BIN / "emmito")
SNAKEMAKE = str(BIN / "snakemake")

TINY_CONFIG: dict[str, Any] = {
    "seed": 0,
    "volumes": {
        "train": {"images": "data/train/images", "labels": "data/train/labels", "label_format": "vast"},
        "deploy": {"images": "data/deploy/images", "labels": "data/deploy/labels", "label_format": "vast"},
    },
    "model": {"name": "tiny", "filters": [4, 8], "patch": [4, 32, 32], "conv3d_from_level": 1, "pool_z_from_level": 1},
    "train": {"volumes": ["train"], "iterations": 6, "batch_size": 2, "val_every": 3, "warmup_iterations": 2},
    "infer": {"volumes": ["deploy"], "chunk_slices": 4, "batch_size": 4},
    "merge": {"block_slices": 8, "block_overlap": 2},
    "segment": {"min_size": 20, "min_seed_size": 5},
}

DATA = {"train": dict(slices=12, size=64, seed=11), "deploy": dict(slices=20, size=64, seed=12)}


def merged(base: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``base`` with ``overrides`` applied one level into each section."""
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def make_project(dest: Path, overrides: dict[str, Any] | None = None, data_from: Path | None = None) -> Path:
    """Lay out a runnable project in ``dest``; returns ``dest``.

    ``data_from`` reuses an earlier project's synthetic data instead of making it again.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "Snakefile", dest / "Snakefile")
    for folder in ("rules", "envs", "profiles", "report"):
        if (REPO / folder).exists():
            shutil.copytree(REPO / folder, dest / folder, dirs_exist_ok=True)
    if (REPO / "tests" / "slurm").exists():
        shutil.copytree(REPO / "tests" / "slurm", dest / "tests" / "slurm", dirs_exist_ok=True)
    if data_from is not None:
        shutil.copytree(data_from / "data", dest / "data", dirs_exist_ok=True)
    else:
        for name, spec in DATA.items():
            subprocess.run(
                [EMMITO, "synth", str(dest / "data" / name), "--slices", str(spec["slices"]),
                 "--size", str(spec["size"]), "--seed", str(spec["seed"])],
                check=True, capture_output=True, text=True,
            )
    (dest / "config.yaml").write_text(yaml.safe_dump(merged(TINY_CONFIG, overrides), sort_keys=False))
    return dest


def snakemake(
    project: Path, *args: str, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the project's workflow with the test venv's snakemake (emmito on PATH); ``env`` set on top."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **(env or {})}
    result = subprocess.run(
        [SNAKEMAKE, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def blob_volume(folder: Path) -> dict[str, Path]:
    """A 12-slice image with two labelled blobs in ``folder``, as image.h5 / label.h5 (training tests)."""
    import numpy as np

    from emmito.contract import fixture

    z, y, x = np.indices((12, 32, 32))
    label = np.zeros((12, 32, 32), np.uint32)
    label[((y - 10) ** 2 + (x - 10) ** 2 < 30) & (z > 1) & (z < 9)] = 1
    label[((y - 22) ** 2 + (x - 21) ** 2 < 40) & (z > 3)] = 2
    rng = np.random.default_rng(0)
    image = np.clip(120 + 80 * (label > 0) + rng.normal(0, 20, label.shape), 0, 255).astype(np.uint8)
    for name, data in (("image", image), ("label", label)):
        fixture(folder / f"{name}.h5", name, data, voxel_size=[40, 8, 8])
    return {"image": folder / "image.h5", "label": folder / "label.h5"}
