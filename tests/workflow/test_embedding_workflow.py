"""The embedding head through the real workflow, set by config alone: train writes the support set,
heat files carry the emb channels, and both embedding decoders segment and trace."""

from __future__ import annotations

import json

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter)
import numpy as np
import pytest
import yaml
from tinyproject import make_project, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

EMBEDDING = {
    "model": {"head": "embedding", "embedding_dim": 4},
    "train": {"discriminative": {"support_voxels": 512}},
    "segment": {"decoder": "nearest_neighbour", "nnc_candidates": 0, "embedding_min_size": 20},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("emb") / "project", overrides=EMBEDDING)
    snakemake(project, "--cores", "2")
    return project


def test_support_set_and_embedding_channels_flow_through(project):
    with np.load(project / "results/model/tiny/support.npz") as support:
        assert support["features"].shape == (512, 4)
        assert sorted(np.unique(support["classes"]).tolist()) == [0, 1]
    with h5py.File(project / "results/deploy/heat/block_0.h5") as f:
        assert list(f["main"].attrs["channels"]) == ["foreground", "emb0", "emb1", "emb2", "emb3"]
        assert f["main"].attrs["embedding_range"] == 8.0
    metrics = json.loads((project / "results/deploy/metrics.json").read_text())
    assert 0.0 <= metrics["voxel_iou"] <= 1.0
    with h5py.File(project / "results/deploy/seg.h5") as f:
        ids = np.unique(f["main"][...])
    assert np.array_equal(ids, np.arange(len(ids))), "global ids must be consecutive from 1"


def test_switching_to_embedding_cluster_reruns_segmentation_only(project):
    checkpoint = project / "results/model/tiny/checkpoint.pt"
    before = checkpoint.stat().st_mtime_ns
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["segment"]["decoder"] = "embedding_cluster"
    (project / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    dry = snakemake(project, "-n", "--quiet", "rules")
    planned = dry.stdout + dry.stderr
    assert "segment" in planned and "train" not in planned and "infer" not in planned
    snakemake(project, "--cores", "2")
    assert checkpoint.stat().st_mtime_ns == before
    log = (project / "results/logs/segment/deploy/block_0.log").read_text()
    assert "(embedding_cluster)" in log


def test_embedding_decoder_without_embedding_head_is_one_line(tmp_path, project):
    bad = make_project(tmp_path / "bad", overrides={"segment": {"decoder": "nearest_neighbour"}}, data_from=project)
    result = snakemake(bad, "-n", check=False)
    assert result.returncode != 0
    assert "segment.decoder nearest_neighbour reads embeddings, but model.head is target: set model.head embedding" in result.stdout + result.stderr
