"""infer.uncertainty: an extra heat channel beside the model's, at no extra forward pass.

tta_std is a running (Welford) standard deviation across the test-time variants, stored as
2 x std (std 0.5 -> 255); entropy is the binary entropy of the mean foreground probability in
bits (1 bit -> 255). The model's channels, the merged blocks' other channels and the labels
segment decodes are the same bytes with and without it.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage

from emmito import cli, config as cfg, contract, io
from emmito.config import section_defaults
from emmito.contract import fixture, save_checkpoint
from emmito.infer import run_cli as infer_cli
from emmito.io import EmmitoError
from emmito.merge import merge_block
from emmito.blocks import Layout
from emmito.model import build_model
from emmito.prediction import binary_entropy, predict_slices, predict_tiles, to_heat, tta_variants
from emmito.synth import synthesize
from emmito.tiling import Tiling
from tinyproject import REPO, TINY_CONFIG, merged, snakemake

TINY = dict(filters=[2, 4], conv3d_from_level=0, pool_z_from_level=0, patch=[4, 8, 8])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model({**section_defaults("model"), **TINY, **overrides})
    with torch.no_grad():  # a larger head makes the variants disagree visibly
        model.head.weight.mul_(20)
    return model.eval()


class Counting(torch.nn.Module):
    """Wraps a model and counts its forward calls."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


def explicit_variants(model: torch.nn.Module, tiles: np.ndarray, count: int) -> np.ndarray:
    """Every variant's probabilities, undone with numpy, held at once: (variant, batch, channel, z, y, x) float64."""
    outputs = []
    for flip_z, flip_y, flip_x, transpose in tta_variants(count):
        axes = tuple(axis for axis, flip in ((2, flip_z), (3, flip_y), (4, flip_x)) if flip)
        augmented = np.flip(tiles, axes) if axes else tiles
        if transpose:
            augmented = augmented.swapaxes(3, 4)
        with torch.inference_mode():
            probability = torch.sigmoid(model(torch.from_numpy(np.ascontiguousarray(augmented)))).numpy()
        if transpose:
            probability = probability.swapaxes(3, 4)
        outputs.append(np.flip(probability, axes) if axes else probability)
    return np.stack(outputs).astype(np.float64)


# ---- (a) the running std is numpy's, (b) at no extra forward pass ---------------------------


@pytest.mark.parametrize("count", [4, 8, 16])
def test_welford_std_equals_the_population_std_of_the_variants(count):
    model = tiny_model(seed=4)
    tiles = np.random.default_rng(5).normal(size=(2, 1, 4, 8, 16)).astype(np.float32)
    with torch.inference_mode():
        plain = predict_tiles(model, torch.from_numpy(tiles), count).numpy()
        with_std = predict_tiles(model, torch.from_numpy(tiles), count, std_of=0).numpy()
    variants = explicit_variants(model, tiles, count)
    assert with_std.shape == (2, 2, 4, 8, 16)
    assert np.array_equal(with_std[:, :1], plain), "the mean must be the same bytes with the std beside it"
    expected = 2.0 * variants[:, :, 0].std(axis=0)  # population std (ddof 0) of the foreground, scaled by 2
    np.testing.assert_allclose(with_std[:, 1], expected, atol=2e-5)
    assert expected.max() > 0.05, "this model is not equivariant, so the variants must disagree"
    assert with_std[:, 1].min() >= 0 and with_std[:, 1].max() <= 1


def test_entropy_is_the_binary_entropy_in_bits_of_the_blended_probability():
    np.testing.assert_allclose(binary_entropy(np.array([0.0, 0.5, 1.0, 0.25], np.float32)), [0, 1, 0, 0.811278], atol=1e-6)
    image = np.random.default_rng(3).integers(0, 256, (9, 12, 10), dtype=np.uint8)
    grid = Tiling.of_patch(TINY["patch"], 0.5)  # overlapping windows: entropy of the blend, not a blend of entropies
    for tta in (1, 4):
        plain = predict_slices(tiny_model(seed=6), lambda a, b: image[a:b], 9, 2, 7, grid, 4, progress=False, tta=tta)
        out = predict_slices(tiny_model(seed=6), lambda a, b: image[a:b], 9, 2, 7, grid, 4, progress=False, tta=tta,
                             uncertainty="entropy")
        assert out.shape == (2, *plain.shape[1:]) and out[:1].tobytes() == plain.tobytes()
        p = np.clip(plain[0].astype(np.float64), 1e-12, 1 - 1e-12)
        np.testing.assert_allclose(out[1], -(p * np.log2(p) + (1 - p) * np.log2(1 - p)), atol=1e-5)
        assert out[1].max() > 0.5


@pytest.mark.parametrize("uncertainty", ["none", "tta_std", "entropy"])
def test_uncertainty_costs_no_extra_forward_pass(uncertainty):
    model = Counting(tiny_model(seed=1))
    tiles = torch.from_numpy(np.random.default_rng(2).normal(size=(2, 1, 4, 8, 8)).astype(np.float32))
    with torch.inference_mode():
        predict_tiles(model, tiles, 4, std_of=0 if uncertainty == "tta_std" else None)
    assert model.calls == 4
    # and through the whole pipeline: one call per batch and variant, whatever the uncertainty
    image = np.random.default_rng(3).integers(0, 256, (8, 12, 12), dtype=np.uint8)
    counted = Counting(tiny_model(seed=1))
    stats: dict[str, int] = {}
    out = predict_slices(counted, lambda a, b: image[a:b], 8, 0, 8, Tiling.of_patch(TINY["patch"], 0.5), 4,
                         progress=False, tta=4, uncertainty=uncertainty, stats=stats)
    plain = Counting(tiny_model(seed=1))
    predict_slices(plain, lambda a, b: image[a:b], 8, 0, 8, Tiling.of_patch(TINY["patch"], 0.5), 4, progress=False, tta=4)
    assert counted.calls == plain.calls and out.shape[0] == (1 if uncertainty == "none" else 2)


@pytest.mark.parametrize("uncertainty, tta", [("tta_std", 4), ("entropy", 1)])
def test_the_uncertainty_of_a_run_of_slices_is_the_whole_volume_s(uncertainty, tta):
    image = np.random.default_rng(8).integers(0, 256, (11, 12, 10), dtype=np.uint8)
    grid = Tiling.of_patch(TINY["patch"], 0.5)
    model = tiny_model(seed=9)
    whole = predict_slices(model, lambda a, b: image[a:b], 11, 0, 11, grid, 4, progress=False, tta=tta, uncertainty=uncertainty)
    part = predict_slices(model, lambda a, b: image[a:b], 11, 3, 8, grid, 4, progress=False, tta=tta, uncertainty=uncertainty)
    assert whole.shape[0] == 2 and part.tobytes() == whole[:, 3:8].tobytes()


def test_tta_std_without_tta_is_refused_before_any_work():
    with pytest.raises(ValueError, match="tta_std needs tta 4, 8 or 16"):
        predict_tiles(tiny_model(), torch.zeros(1, 1, 4, 8, 8), 1, std_of=0)
    with pytest.raises(ValueError, match="uncertainty must be one of"):
        predict_slices(tiny_model(), lambda a, b: np.zeros((b - a, 8, 8), np.uint8), 4, 0, 4,
                       Tiling.of_patch(TINY["patch"], 0.5), 1, progress=False, uncertainty="variance")


# ---- (c) infer writes the channel; the others are the same bytes; merge carries it ------------


def infer_params(infer: dict) -> cfg.Validated:
    return cfg.validate_sections({"model": dict(TINY), "infer": {"chunk_slices": 4, "tile": "patch", "tile_overlap": 0.5,
                                                                    "tile_crop": 0, **infer}})


def write_inputs(folder, target: str = "binary"):
    image = np.random.default_rng(2).integers(0, 256, (10, 20, 24), dtype=np.uint8)
    fixture(folder / "image.h5", "image", image, voxel_size=[40, 8, 8])
    model = tiny_model(target=target)
    model_cfg = {**section_defaults("model"), **TINY, "target": target}
    channels = ["foreground", "contour"] if target == "binary_contour" else ["foreground"]
    save_checkpoint(folder / "ckpt.pt", {"model_config": model_cfg, "state_dict": model.state_dict(), "channels": channels,
                                          "input_norm": {"mean": 127.5, "std": 127.5}})
    return channels


def run_infer(folder, name: str, infer: dict) -> tuple:
    job = folder / name
    args = argparse.Namespace(image=folder / "image.h5", checkpoint=folder / "ckpt.pt", out=job, chunk=None, chunks=[0, 1, 2])
    infer_cli(args, infer_params(infer))
    return {c: io.read_volume(job / contract.heat_chunk_name(c)) for c in range(3)}, job


@pytest.mark.parametrize("target", ["binary", "binary_contour"])
def test_infer_appends_the_uncertainty_channel_and_keeps_the_other_channels_bytes(tmp_path, target):
    channels = write_inputs(tmp_path, target)
    plain, plain_job = run_infer(tmp_path, "plain", {"tta": 4})
    std, std_job = run_infer(tmp_path, "std", {"tta": 4, "uncertainty": "tta_std"})
    for c in range(3):
        (heat, attrs), (heat_u, attrs_u) = plain[c], std[c]
        assert list(attrs["channels"]) == channels and contract.UNCERTAINTY_KIND not in attrs
        assert list(attrs_u["channels"]) == [*channels, contract.UNCERTAINTY_CHANNEL]
        assert attrs_u[contract.UNCERTAINTY_KIND] == "tta_std"
        assert heat_u.dtype == np.uint8 and heat_u.shape == (len(channels) + 1, *heat.shape[1:])
        assert heat_u[: len(channels)].tobytes() == heat.tobytes()
    spread = np.concatenate([std[c][0][-1] for c in range(3)])
    assert spread.max() > 10, "a random model's flips disagree"
    # tta 1 with entropy: the same foreground as tta 1 without it, entropy high where the heat is near 128
    plain1, _ = run_infer(tmp_path, "plain1", {})
    entropy, _ = run_infer(tmp_path, "entropy", {"uncertainty": "entropy"})
    for c in range(3):
        heat, heat_e = plain1[c][0], entropy[c][0]
        assert heat_e[: len(channels)].tobytes() == heat.tobytes()
        p = heat[0].astype(np.float64) / 255
        bits = -(np.clip(p, 1e-9, 1) * np.log2(np.clip(p, 1e-9, 1)) + np.clip(1 - p, 1e-9, 1) * np.log2(np.clip(1 - p, 1e-9, 1)))
        # from the uint8 heat, rounded once more; entropy is steep near 0 and 1, so compare in between
        inside = (heat[0] >= 8) & (heat[0] <= 247)
        assert inside.sum() > 50 and np.abs(heat_e[-1].astype(int) - to_heat(bits).astype(int))[inside].max() <= 3
        assert entropy[c][1][contract.UNCERTAINTY_KIND] == "entropy"
    # merge carries the channel and its kind into the block, unchanged
    layout = Layout.from_config(cfg.validate_sections({"infer": {"chunk_slices": 4}, "merge": {"block_slices": 8, "block_overlap": 2}}))
    for job, name in ((plain_job, "plain"), (std_job, "std")):
        merge_block(tmp_path / f"block_{name}.h5", [job / contract.heat_chunk_name(c) for c in range(3)], 0, layout)
    block, block_attrs = io.read_volume(tmp_path / "block_std.h5")
    block_plain, _ = io.read_volume(tmp_path / "block_plain.h5")
    assert list(block_attrs["channels"]) == [*channels, contract.UNCERTAINTY_CHANNEL]
    assert block_attrs[contract.UNCERTAINTY_KIND] == "tta_std"
    assert block[: len(channels)].tobytes() == block_plain.tobytes()
    assert block[-1].tobytes() == np.concatenate([std[0][0][-1], std[1][0][-1], std[2][0][-1][:2]]).tobytes()


def test_merge_refuses_chunks_with_and_without_the_channel(tmp_path):
    write_inputs(tmp_path)
    _, plain_job = run_infer(tmp_path, "plain", {"tta": 4})
    _, std_job = run_infer(tmp_path, "std", {"tta": 4, "uncertainty": "tta_std"})
    layout = Layout.from_config(cfg.validate_sections({"infer": {"chunk_slices": 4}, "merge": {"block_slices": 8, "block_overlap": 2}}))
    mixed = [plain_job / contract.heat_chunk_name(0), std_job / contract.heat_chunk_name(1), plain_job / contract.heat_chunk_name(2)]
    with pytest.raises(EmmitoError, match="different volumes or runs"):
        merge_block(tmp_path / "block.h5", mixed, 0, layout)


# ---- (d) config: tta_std needs tta; the key reruns infer only -------------------------------


@pytest.mark.bad_input
def test_tta_std_with_tta_1_is_one_line_naming_the_key_and_the_fix(tmp_path):
    raw = merged(TINY_CONFIG, {"infer": {"uncertainty": "tta_std"}})
    with pytest.raises(EmmitoError) as info:
        cfg.validate(raw, source="my.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("my.yaml: infer.uncertainty tta_std needs infer.tta 4, 8 or 16")
    assert "infer.tta: 4" in message and "entropy" in message
    with pytest.raises(EmmitoError, match=r"^--params: infer.uncertainty tta_std needs infer.tta"):
        cfg.validate_sections({"infer": {"uncertainty": "tta_std"}}, source="--params")
    for fine in ({"uncertainty": "tta_std", "tta": 4}, {"uncertainty": "entropy"}, {"uncertainty": "none", "tta": 16}):
        cfg.validate(merged(TINY_CONFIG, {"infer": fine}))
    with pytest.raises(EmmitoError, match="infer.uncertainty"):
        cfg.validate(merged(TINY_CONFIG, {"infer": {"uncertainty": "std"}}))
    status = cli.main(["infer", "image.h5", "ckpt.pt", str(tmp_path / "out.h5"), "--chunk", "0",
                       "--params", '{"infer": {"uncertainty": "tta_std"}}'])
    assert status == 2 and not (tmp_path / "out.h5").exists()


def test_the_key_is_off_by_default_and_changes_the_params_of_infer_only():
    raw = {"volumes": {"v": {"images": "slices/"}}, "infer": {"volumes": ["v"], "tta": 4}}
    before = cfg.validate(merged(raw, {}))
    assert before["infer"]["uncertainty"] == "none"
    assert cfg.key_stages("infer.uncertainty") == ["infer"]
    for kind in ("tta_std", "entropy"):
        after = cfg.validate(merged(raw, {"infer": {"uncertainty": kind}}))
        changed = {s for s in contract.OUTPUT_VERSIONS if cfg.stage_params(before, s) != cfg.stage_params(after, s)}
        assert changed == {"infer"}
        assert cfg.stage_params(after, "infer")["infer"]["uncertainty"] == kind
    assert "uncertainty" not in cfg.runtime_params(before, "infer")["infer"]


def test_the_demo_config_keeps_an_uncertainty_channel():
    demo = cfg.load(REPO / "config.yaml")
    assert demo["infer"]["uncertainty"] != "none"


@pytest.mark.workflow
@pytest.mark.bad_input
def test_snakemake_refuses_tta_std_without_tta_at_parse(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    shutil.copy2(REPO / "Snakefile", project / "Snakefile")
    shutil.copytree(REPO / "rules", project / "rules")
    config = merged(TINY_CONFIG, {"infer": {"uncertainty": "tta_std"}})
    (project / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    result = snakemake(project, "-n", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output
    assert "infer.uncertainty tta_std needs infer.tta 4, 8 or 16" in output
    assert not (project / "results").exists()


# ---- (e) segment ignores the channel ----------------------------------------------------------


def smooth_heat(labels: np.ndarray) -> np.ndarray:
    return to_heat(ndimage.gaussian_filter((labels > 0).astype(np.float32), 1.0))


@pytest.mark.parametrize("target", ["binary", "binary_contour"])
def test_segment_gives_the_same_labels_and_scores_with_the_extra_channel(tmp_path, target):
    _, labels = synthesize(16, 64, seed=5)
    heat = [smooth_heat(labels)]
    names = ["foreground"]
    if target == "binary_contour":
        inner = ndimage.binary_erosion(labels > 0, iterations=1)
        heat.append(to_heat(ndimage.gaussian_filter(((labels > 0) & ~inner).astype(np.float32), 0.7)))
        names.append("contour")
    noise = np.random.default_rng(9).integers(0, 256, labels.shape, dtype=np.uint8)
    fixture(tmp_path / "heat.h5", "heat", np.stack(heat), channels=names)
    fixture(tmp_path / "heat_u.h5", "heat", np.stack([*heat, noise]), channels=[*names, contract.UNCERTAINTY_CHANNEL],
            attrs={contract.UNCERTAINTY_KIND: "tta_std"})
    params = '{"segment": {"min_size": 20, "min_seed_size": 4}}'
    for name in ("heat", "heat_u"):
        assert cli.main(["segment", str(tmp_path / f"{name}.h5"), str(tmp_path / f"seg_{name}.h5"), "--params", params]) == 0
    seg, _ = io.read_volume(tmp_path / "seg_heat.h5")
    seg_u, _ = io.read_volume(tmp_path / "seg_heat_u.h5")
    assert seg.max() > 3 and seg.tobytes() == seg_u.tobytes()
    with io.open_volume(tmp_path / "seg_heat.h5") as ds, io.open_volume(tmp_path / "seg_heat_u.h5") as ds_u:
        assert np.array_equal(io.read_table(ds, contract.SLICE_SCORES, contract.SLICE_SCORE_COLUMNS),
                              io.read_table(ds_u, contract.SLICE_SCORES, contract.SLICE_SCORE_COLUMNS))
