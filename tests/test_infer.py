"""Inference: seamless chunks, blending, downsampling, heat-file contract, checkpoint errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from emmito import __version__, io
from emmito.config import section_defaults
from emmito.infer import (
    infer_chunk,
    load_checkpoint,
    mean_pool_xy,
    predict_slices,
    reflect_index,
    run_cli,
    to_heat,
    window_starts,
)
from emmito.io import EmmitoError
from emmito.model import build_model
from emmito.train import save_checkpoint

TINY = dict(filters=[2, 4], conv3d_from_level=0, pool_z_from_level=0, patch=[4, 8, 8])


def params(model: dict | None = None, infer: dict | None = None) -> dict:
    return {
        "seed": 0,
        "model": {**section_defaults("model"), **TINY, **(model or {})},
        "infer": {**section_defaults("infer"), **(infer or {})},
    }


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model({**section_defaults("model"), **TINY, **overrides})
    # Random-init GroupNorm/conv nets answer almost the same everywhere; a larger head makes differences visible.
    with torch.no_grad():
        model.head.weight.mul_(20)
    return model.eval()


class Identity(torch.nn.Module):
    """A 'network' whose logits are its input: every window predicts the same value for a voxel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def expected_identity(image: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(image.astype(np.float64) - 127.5) / 127.5))


def test_window_grid_covers_the_axis_at_a_constant_stride():
    for size, patch, stride in [(11, 4, 2), (192, 96, 48), (5, 8, 4), (100, 16, 16), (1, 1, 1)]:
        starts = window_starts(size, patch, stride)
        assert starts[0] <= 0 and starts[-1] + patch >= size
        assert np.all(np.diff(starts) == stride)
        # The fewest windows: dropping the last one would leave voxels uncovered.
        assert len(starts) == 1 or starts[-2] + patch - starts[0] < size
    assert list(reflect_index(np.arange(-3, 8), 4)) == [3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1]


@pytest.mark.parametrize("shape, patch", [((11, 13, 18), (4, 8, 8)), ((7, 5, 9), (4, 8, 8))])
def test_blending_is_normalised_and_reflection_aligned(shape, patch):
    # With an identity network every window agrees, so any error in placement, reflection
    # or weight normalisation shows up as a difference from the pointwise answer.
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    probability = predict_slices(Identity(), lambda a, b: image[a:b], shape[0], 2, shape[0] - 1, patch, 0.5, 3, progress=False)
    assert probability.shape == (1, shape[0] - 3, *shape[1:])
    np.testing.assert_allclose(probability[0], expected_identity(image[2:-1]), atol=2e-6)


def test_chunked_inference_equals_whole_volume_inference_for_any_chunk_size():
    depth = 11
    image = np.random.default_rng(0).integers(0, 256, (depth, 10, 13), dtype=np.uint8)
    model = tiny_model()
    reads: list[tuple[int, int]] = []

    def read(a: int, b: int) -> np.ndarray:
        reads.append((a, b))
        return image[a:b]

    whole = to_heat(predict_slices(model, read, depth, 0, depth, TINY["patch"], 0.5, 4, progress=False))
    assert whole.std() > 5, "the tiny model must give a non-trivial heatmap for this test to mean anything"
    for chunk_slices in (1, 3, 5):
        cfg = params(infer={"chunk_slices": chunk_slices, "batch_size": 3})
        reads.clear()
        chunks = [infer_chunk(model, read, depth, c, cfg["model"], cfg["infer"])[0] for c in range(-(-depth // chunk_slices))]
        stitched = np.concatenate(chunks, axis=1)
        assert stitched.shape == whole.shape
        assert np.abs(stitched.astype(int) - whole.astype(int)).max() <= 1
        # Each chunk reads its slices plus a halo of less than a window, never the whole volume.
        for c, (a, b) in enumerate(reads):
            start, stop = c * chunk_slices, min((c + 1) * chunk_slices, depth)
            assert a <= start and b >= stop and (b - a) - (stop - start) <= 2 * TINY["patch"][0]
        assert any(b - a < depth for a, b in reads)


def test_mean_pool_xy_averages_blocks_and_edge_remainders():
    slices = np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4)
    pooled = mean_pool_xy(slices, 2)
    assert pooled.shape == (2, 3, 2) and pooled.dtype == np.float32
    assert pooled[0, 0, 0] == np.mean([0, 1, 4, 5])
    assert pooled[1, 2, 1] == np.mean([38, 39])  # the last row has only itself to average with
    assert mean_pool_xy(slices, 1) is slices


def write_fixture(tmp_path, shape=(6, 20, 24)) -> tuple:
    image = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    io.write_volume(tmp_path / "image.h5", image, voxel_size=[40, 8, 8])
    model = tiny_model()
    save_checkpoint(
        tmp_path / "ckpt.pt",
        {"model_config": params()["model"], "state_dict": model.state_dict(), "channels": ["foreground"],
         "input_norm": {"mean": 127.5, "std": 127.5}, "emmito_version": __version__},
    )
    return image, model


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_infer_cli_writes_the_heat_contract(tmp_path, factor):
    image, model = write_fixture(tmp_path)
    cfg = params(infer={"chunk_slices": 4, "downsample_xy": factor})
    args = argparse.Namespace(image=tmp_path / "image.h5", checkpoint=tmp_path / "ckpt.pt", out=tmp_path / "chunk_1.h5", chunk=1)
    run_cli(args, cfg)
    heat, attrs = io.read_volume(tmp_path / "chunk_1.h5")
    assert heat.dtype == np.uint8 and heat.shape == (1, 2, -(-20 // factor), -(-24 // factor))
    assert attrs["offset"] == 4 and attrs["volume_depth"] == 6 and attrs["downsample_xy"] == factor
    assert attrs["voxel_size"] == [40.0, 8.0 * factor, 8.0 * factor]
    assert list(attrs["channels"]) == ["foreground"]
    pooled = mean_pool_xy(image, factor)
    expected = to_heat(predict_slices(model, lambda a, b: pooled[a:b], 6, 4, 6, TINY["patch"], 0.5, 4, progress=False))
    assert np.abs(heat.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.bad_input
def test_a_checkpoint_of_another_architecture_is_refused_by_name(tmp_path):
    write_fixture(tmp_path)
    with pytest.raises(EmmitoError, match=r"ckpt\.pt was trained with model\.filters=\[2,4\], the config says \[4,8\]: retrain or fix the config"):
        load_checkpoint(tmp_path / "ckpt.pt", params(model={"filters": [4, 8]})["model"])
    # The inference patch may differ from the training patch: it is not part of the architecture.
    model, checkpoint = load_checkpoint(tmp_path / "ckpt.pt", params(model={"patch": [2, 16, 16]})["model"])
    assert checkpoint["channels"] == ["foreground"] and not model.training


@pytest.mark.bad_input
def test_missing_or_corrupt_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(EmmitoError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(EmmitoError, match=r"bad\.pt: not a readable checkpoint .*corrupt") as error:
        load_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(error.value)


@pytest.mark.bad_input
def test_infer_verb_reports_a_mismatch_in_one_line(tmp_path):
    write_fixture(tmp_path)
    emmito = [sys.executable, "-m", "emmito.cli"]
    result = subprocess.run(
        [*emmito, "infer", str(tmp_path / "image.h5"), str(tmp_path / "ckpt.pt"), str(tmp_path / "out.h5"), "--chunk", "0",
         "--params", json.dumps({"model": {**TINY, "norm": "batch"}})],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.norm=group, the config says batch" in result.stderr
    assert not (tmp_path / "out.h5").exists()
