"""The real workflow, end to end, on a tiny synthetic volume in a temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter)
import numpy as np
import pytest
from tinyproject import make_project, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("wf") / "project")
    snakemake(project, "--cores", "2")
    return project


def test_final_outputs(project):
    seg_path = project / "results/deploy/seg.h5"
    with h5py.File(project / "results/deploy/image.h5") as f:
        image_shape = f["main"].shape
    with h5py.File(seg_path) as f:
        seg = f["main"][...]
        assert seg.dtype == np.uint32
        assert seg.shape == image_shape
        assert "s1" in f and f["s1"].shape[1] == (image_shape[1] + 1) // 2
    ids = np.unique(seg)
    assert ids[0] == 0 and len(ids) > 1, "the tiny model found no object at all"
    assert np.array_equal(ids, np.arange(len(ids))), "global ids must be consecutive from 1"
    id_map = json.loads((project / "results/deploy/trace.json").read_text())
    assert len(id_map["objects"]) == len(ids) - 1
    metrics = json.loads((project / "results/deploy/metrics.json").read_text())
    for key in ("instance_f1", "instance_precision", "instance_recall", "voxel_iou"):
        assert 0.0 <= metrics[key] <= 1.0


def test_chunks_and_blocks_all_ran(project):
    heat = sorted((project / "results/deploy/heat").glob("job_*/chunk_*.h5"))
    blocks = sorted((project / "results/deploy/seg").glob("block_*.h5"))
    assert len(heat) == 5  # 20 slices in chunks of 4, one per job (infer.chunks_per_job 1)
    assert [p.parent.name for p in heat] == [f"job_{c}" for c in range(5)]
    assert len(blocks) == 3  # 20 slices in blocks of 8
    for rule in ("convert", "train", "infer", "merge", "segment", "trace", "upsample", "evaluate"):
        assert list((project / "results").rglob(f"*{rule}*")), f"no log or benchmark of rule {rule}"


def test_jobs_of_three_chunks_give_the_same_heat_blocks(project, tmp_path):
    """infer.chunks_per_job 3: two infer jobs instead of five, and merge's blocks are the same bytes."""
    copy = tmp_path / "cpj3"
    shutil.copytree(project, copy, symlinks=True, ignore=shutil.ignore_patterns(".snakemake"))
    (copy / "jobs.yaml").write_text("infer:\n  chunks_per_job: 3\n")
    blocks = [f"results/deploy/heat/block_{b}.h5" for b in range(3)]
    result = snakemake(copy, "--cores", "2", "--configfile", "config.yaml", "jobs.yaml", "--forcerun", "infer", *blocks)
    assert result.stderr.count("rule infer:") == 2, result.stderr[-3000:]
    jobs = sorted(p.relative_to(copy / "results/deploy/heat").as_posix() for p in (copy / "results/deploy/heat").glob("job_*/chunk_*.h5"))
    assert "job_0/chunk_2.h5" in jobs and "job_1/chunk_4.h5" in jobs
    for block in blocks:
        with h5py.File(project / block) as one, h5py.File(copy / block) as three:
            assert np.array_equal(one["main"][...], three["main"][...]), block


def test_dry_run_after_completion_has_nothing_to_do(project):
    result = snakemake(project, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_rerun_one_block_by_naming_its_file(project):
    target = project / "results/deploy/seg/block_1.h5"
    before = h5py.File(target)["main"][...]
    mtime = target.stat().st_mtime_ns
    result = snakemake(project, "--cores", "1", "--force", "results/deploy/seg/block_1.h5")
    assert "segment" in result.stderr
    assert target.stat().st_mtime_ns != mtime
    assert np.array_equal(h5py.File(target)["main"][...], before), "same input and params must give the same block"
    # only that block's segmentation ran: trace and later stages were not asked for
    assert "rule trace" not in result.stderr


def test_dag_renders(project):
    dot = snakemake(project, "--rulegraph").stdout
    assert dot.lstrip().startswith("digraph")
    for rule in ("convert", "train", "infer", "merge", "segment", "trace", "upsample", "evaluate"):
        assert rule in dot
    if shutil.which("dot"):
        svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, check=True).stdout
        assert "<svg" in svg


def test_lint_is_clean(project):
    result = snakemake(project, "--lint", check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_typo_is_one_line(tmp_path, project):
    bad = make_project(tmp_path / "bad", overrides={"segment": {"min_sise": 5}}, data_from=project)
    result = snakemake(bad, "-n", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "unknown key 'min_sise' in 'segment': check the spelling" in output


def test_snakefmt_is_clean():
    from tinyproject import BIN, REPO

    result = subprocess.run(
        [str(BIN / "snakefmt"), "--check", "Snakefile", "rules/"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_missing_demo_data_says_make_data(tmp_path, project):
    """A fresh clone dry-run before `make data`: the error says how to make the demo data."""
    demo = {"images": "data/demo/train/images", "labels": "data/demo/train/labels", "label_format": "vast"}
    fresh = make_project(tmp_path / "fresh", overrides={"volumes": {"train": demo, "deploy": demo}}, data_from=project)
    result = snakemake(fresh, "-n", check=False)
    assert result.returncode != 0
    assert "data/demo/train/images does not exist yet: make the demo data with `make data`" in result.stdout + result.stderr
