"""Training: targets, sampling, schedule, byte-identical checkpoints, learning on blobs, the CLI wrapper."""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pytest
import torch

from emmito import contract
from emmito.config import section_defaults
from emmito.contract import fixture, save_checkpoint
from emmito.io import EmmitoError
from emmito.model import load_checkpoint
from emmito.prediction import Tiling, predict_slices
from emmito.resampling import mean_pool_xy, pool_pair
from emmito.targets import binary_target
from emmito.train import PatchSampler, learning_rate_factor, run_cli, train_model

TINY = dict(filters=[4, 8], conv3d_from_level=1, pool_z_from_level=1, patch=[4, 16, 16])


def params(seed: int = 0, **train) -> dict:
    """Train's params: seed, model and train (complete sections, as the CLI gives).

    Training reads no other section; ``infer`` is here for the tests that predict
    with ``prediction.predict_volume`` themselves.
    """
    return {
        "seed": seed,
        "model": {**section_defaults("model"), **TINY},
        "train": {**section_defaults("train"), "iterations": 3, "batch_size": 2, "warmup_iterations": 1, "threads": 1, **train},
        "infer": {**section_defaults("infer"), "batch_size": 8},
    }


def blob_volume(seed: int, shape=(8, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """Bright ellipsoids (ids 1..n) on a dark noisy background, two of them touching."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    label = np.zeros(shape, np.uint32)
    centres = [(4, 8, 8), (4, 8, 17), (4, 24, 22)]  # the first two touch
    for index, (cz, cy, cx) in enumerate(centres, start=1):
        inside = ((z - cz) / 3) ** 2 + ((y - cy) / 5) ** 2 + ((x - cx) / 5) ** 2 <= 1
        label[inside & (label == 0)] = index
    image = np.where(label > 0, 170, 80) + rng.normal(0, 12, shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def test_touching_instances_are_split_by_a_background_border():
    label = np.zeros((1, 3, 6), np.uint32)
    label[0, :, 1:3] = 1
    label[0, :, 3:5] = 2
    target = binary_target(label)
    assert target.dtype == np.uint8
    assert target[0].tolist() == [[0, 1, 0, 0, 1, 0]] * 3
    # An instance next to background keeps its edge.
    alone = np.zeros((1, 3, 3), np.uint32)
    alone[0, 1, 1] = 7
    assert binary_target(alone).sum() == 1


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    factors = [learning_rate_factor(i, 4, 20) for i in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert factors[-1] < 0.01 and learning_rate_factor(12, 4, 20) == pytest.approx(0.5)


def test_foreground_patches_hold_foreground_and_small_volumes_are_padded():
    image, label = blob_volume(0)
    sparse = np.zeros_like(label)
    sparse[6, 30, 2] = 5  # one labelled voxel in a corner: uniform sampling would almost never hit it
    sampler = PatchSampler([(image, sparse), (image[:2], label[:2])], TINY["patch"], foreground_fraction=1.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        patch_image, target = sampler.sample(rng)
        assert patch_image.shape == (4, 16, 16) and target.shape == (1, 4, 16, 16)
        assert target.any()


def test_three_iterations_give_a_byte_identical_checkpoint(tmp_path):
    volume = blob_volume(0)
    digests = []
    for run, seed in enumerate((0, 0, 1)):
        checkpoint, metrics = train_model([volume], [blob_volume(1)], params(seed, val_every=2, warmup_iterations=2), progress=False)
        save_checkpoint(tmp_path / f"run{run}.pt", checkpoint)
        digests.append(hashlib.sha256((tmp_path / f"run{run}.pt").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert digests[0] != digests[2]
    assert [m["iteration"] for m in metrics] == [1, 2, 3]
    assert ["val_iou" in m for m in metrics] == [False, True, True]
    assert all(0.0 <= m["val_f1"] <= 1.0 for m in metrics if "val_f1" in m)
    assert [m["lr"] for m in metrics] == pytest.approx([0.001, 0.002, 0.002])
    assert checkpoint["channels"] == ["foreground"] and checkpoint["input_norm"] == {"mean": 127.5, "std": 127.5}
    assert set(checkpoint) >= {"model_config", "target", "state_dict", "last_state_dict", "iteration", "emmito_version"}
    assert not torch.are_deterministic_algorithms_enabled()  # the global switch is restored


def test_training_learns_blobs_and_keeps_the_best_validation_state():
    cfg = params(iterations=150, val_every=50, warmup_iterations=10, learning_rate=0.01)
    checkpoint, metrics = train_model([blob_volume(0), blob_volume(2)], [blob_volume(1)], cfg, progress=False)
    ious = {m["iteration"]: m["val_iou"] for m in metrics if "val_iou" in m}
    assert set(ious) == {50, 100, 150}
    assert checkpoint["best_val_iou"] == pytest.approx(max(ious.values()), abs=1e-6)
    assert checkpoint["best_val_iou"] > 0.8
    assert checkpoint["best_iteration"] == max(ious, key=ious.get)
    # The stored best weights reproduce the logged IoU through the inference path.
    from emmito.model import build_model

    model = build_model(cfg["model"])
    model.load_state_dict(checkpoint["state_dict"])
    image, label = blob_volume(1)
    probability = predict_slices(model, lambda a, b: image[a:b], 8, 0, 8, Tiling.of_patch(TINY["patch"], 0.5), 8, progress=False)[0]
    predicted = probability > 0.5
    assert np.count_nonzero(predicted & (label > 0)) / np.count_nonzero(predicted | (label > 0)) == pytest.approx(checkpoint["best_val_iou"], abs=1e-6)


def cli_args(tmp_path, **extra) -> argparse.Namespace:
    """``emmito train`` arguments for one blob volume written to ``tmp_path``, outputs under tmp_path/model."""
    image, label = blob_volume(0)
    fixture(tmp_path / "image.h5", "image", image, voxel_size=[40, 8, 8])
    fixture(tmp_path / "label.h5", "label", label, voxel_size=[40, 8, 8])
    return argparse.Namespace(
        train=[[tmp_path / "image.h5", tmp_path / "label.h5"]], val=[],
        checkpoint=tmp_path / "model" / "checkpoint.pt", metrics=tmp_path / "model" / "metrics.jsonl", **extra,
    )


def test_train_cli_writes_checkpoint_and_metrics(tmp_path):
    args = cli_args(tmp_path)
    run_cli(args, params(iterations=2))
    lines = [json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [1, 2] and all("loss" in line and "seconds" in line for line in lines)
    _, checkpoint = load_checkpoint(args.checkpoint, params()["model"])
    assert checkpoint["iteration"] == 2 and "last_state_dict" not in checkpoint
    assert checkpoint[contract.CHECKPOINT_VOXEL_SIZE] == [40.0, 8.0, 8.0]  # the image file's voxel size
    # The resume state is removed once the checkpoint is written.
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


@pytest.mark.bad_input
def test_image_and_label_of_different_shapes_are_refused(tmp_path):
    image, label = blob_volume(0)
    fixture(tmp_path / "image.h5", "image", image, voxel_size=[40, 8, 8])
    fixture(tmp_path / "label.h5", "label", label[:, :30], voxel_size=[40, 8, 8])
    args = argparse.Namespace(train=[[tmp_path / "image.h5", tmp_path / "label.h5"]], val=[], checkpoint=tmp_path / "c.pt", metrics=tmp_path / "m.jsonl")
    with pytest.raises(EmmitoError, match=r"label\.h5 is 8x30x32 but .*image\.h5 is 8x32x32"):
        run_cli(args, params())
    assert not (tmp_path / "c.pt").exists()


def test_resume_after_preemption_gives_the_same_weights_as_one_run(tmp_path):
    volume = blob_volume(0)
    cfg = params(iterations=4, warmup_iterations=2, save_every=1, augment_kinds=["flip", "rot90", "intensity", "elastic", "noise"])
    whole, whole_metrics = train_model([volume], [], cfg, progress=False)
    state = tmp_path / "ckpt.pt.resume"
    half, _ = train_model([volume], [], cfg, progress=False, resume_path=state, stop_after=2)
    assert half["iteration"] == 2 and state.exists()
    assert not all(torch.equal(half["state_dict"][k], whole["state_dict"][k]) for k in whole["state_dict"])
    resumed, resumed_metrics = train_model([volume], [], cfg, progress=False, resume_path=state)
    assert resumed["iteration"] == 4
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert [(m["loss"], m["lr"]) for m in resumed_metrics] == [(m["loss"], m["lr"]) for m in whole_metrics]
    # A state from another config is not resumed (it starts over, so the result equals a fresh run).
    other = params(seed=1, iterations=4, warmup_iterations=2, save_every=1)
    fresh, _ = train_model([volume], [], other, progress=False)
    from_stale, _ = train_model([volume], [], other, progress=False, resume_path=state)
    assert all(torch.equal(fresh["state_dict"][k], from_stale["state_dict"][k]) for k in fresh["state_dict"])


def test_training_sees_the_inference_scale(monkeypatch):
    image, label = blob_volume(0, shape=(4, 8, 8))
    pooled_image, pooled_label = pool_pair(image, label, 2)
    assert np.array_equal(pooled_image, mean_pool_xy(image, 2)) and pooled_image.shape == (4, 4, 4)
    assert pooled_label.shape == (4, 4, 4) and pooled_label.dtype == label.dtype
    # Mode pooling: a 2x2 block with any labelled voxel takes its most frequent label.
    block = np.array([[[0, 3], [3, 5]]], np.uint32)
    assert pool_pair(np.zeros((1, 2, 2), np.uint8), block, 2)[1].tolist() == [[[3]]]
    assert pool_pair(np.zeros((1, 4, 4), np.uint8), np.full((1, 4, 4), 7, np.uint32), 4)[1].tolist() == [[[7]]]

    seen = []
    original = PatchSampler.__init__

    def spy(self, volumes, *args, **kwargs):
        seen.extend((v[0].shape, v[0].dtype) for v in volumes)
        original(self, volumes, *args, **kwargs)

    monkeypatch.setattr(PatchSampler, "__init__", spy)
    cfg = params(iterations=1)
    cfg["model"][contract.DOWNSAMPLE_XY] = 2
    checkpoint, _ = train_model([blob_volume(0, shape=(8, 64, 64))], [], cfg, progress=False, voxel_size=[40, 8, 8])
    assert seen == [((8, 32, 32), np.float32)] and checkpoint[contract.CHECKPOINT_DOWNSAMPLE_XY] == 2
    # The checkpoint records the voxels the network saw: the images' y and x times the pooling.
    assert checkpoint[contract.CHECKPOINT_VOXEL_SIZE] == [40.0, 16.0, 16.0]
    assert checkpoint[contract.CHECKPOINT_MODEL_CONFIG][contract.DOWNSAMPLE_XY] == 2


@pytest.mark.parametrize("target", ["binary_contour", "skeleton_distance"])
def test_other_targets_train_with_deep_supervision_and_tensorboard(tmp_path, target):
    pytest.importorskip("tensorboard")
    cfg = params(iterations=2, val_every=2, warmup_iterations=1)
    cfg["model"] = {**cfg["model"], "target": target, "deep_supervision": 1, "filters": [4, 8, 8]}
    cfg["train"]["loss_weights"] = {**cfg["train"]["loss_weights"], "skeleton_distance": {"ohem_mse": 1.0, "ohem_bce": 1.0, "mse": 0.5}}
    checkpoint, metrics = train_model([blob_volume(0)], [blob_volume(1)], cfg, progress=False, tensorboard_dir=tmp_path / "tb")
    channels = 2 if target == "binary_contour" else 1
    assert checkpoint["state_dict"]["head.weight"].shape[0] == channels
    assert any(k.startswith("aux_heads.0") for k in checkpoint["state_dict"])
    assert checkpoint["channels"] == (["foreground", "contour"] if target == "binary_contour" else ["skeleton_distance"])
    assert np.isfinite(metrics[-1]["loss"]) and "val_iou" in metrics[-1]
    assert any((tmp_path / "tb").iterdir())


# ---- training's own validation settings ------------------------------------------------------


def test_validation_has_settings_of_its_own_and_never_reads_the_infer_section():
    from emmito.train import VALIDATION_BLEND_SIGMA, VALIDATION_TILE_OVERLAP, VALIDATION_TTA

    assert (VALIDATION_TILE_OVERLAP, VALIDATION_TTA) == (0.5, 1)
    assert VALIDATION_BLEND_SIGMA == section_defaults("infer")["blend_sigma"]
    volume, validation = blob_volume(0), blob_volume(1)
    plain = params(iterations=4, val_every=2)
    del plain["infer"]
    odd = params(iterations=4, val_every=2)
    odd["infer"] = {**odd["infer"], "tile_overlap": 0.0, "tta": 16, "blend_sigma": 1.0, "batch_size": 1}
    odd["segment"] = {**section_defaults("segment"), "foreground_threshold": 250, "min_size": 10**6}
    first, first_metrics = train_model([volume], [validation], plain, progress=False)
    second, second_metrics = train_model([volume], [validation], odd, progress=False)
    assert contract.checkpoint_bytes(first) == contract.checkpoint_bytes(second)
    assert [m.get("val_f1") for m in first_metrics] == [m.get("val_f1") for m in second_metrics]
    assert first_metrics[-1]["val_iou"] > 0  # validation ran


# ---- fine-tuning: train.init_from, train.freeze ------------------------------------------------


def validated(model: dict | None = None, **train) -> dict:
    """Train's params as the CLI hands them: every section filled, ``explicit`` = the keys given here."""
    from emmito.config import validate_sections

    base = {"iterations": 3, "batch_size": 2, "warmup_iterations": 1, "threads": 1}
    return validate_sections({"seed": 0, "model": dict(model or {}), "train": {**base, **train}})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 20-iteration checkpoint of TINY on blobs, as train writes it (8 nm voxels, no pooling)."""
    path = tmp_path_factory.mktemp("pretrained") / "checkpoint.pt"
    checkpoint, _ = train_model([blob_volume(0)], [], params(iterations=20), progress=False, voxel_size=[40, 8, 8])
    save_checkpoint(path, checkpoint)
    return path


def test_init_from_starts_from_the_checkpoint_weights_with_its_architecture(pretrained):
    # No model key set: the architecture (filters [4, 8], the levels, the patch) is the checkpoint's, not the defaults.
    cfg = validated(init_from=str(pretrained), learning_rate=1e-9, warmup_iterations=0, iterations=1)
    tuned, _ = train_model([blob_volume(2)], [], cfg, progress=False, voxel_size=[40, 8, 8])
    start = contract.read_checkpoint(pretrained)[contract.CHECKPOINT_STATE]
    assert tuned[contract.CHECKPOINT_MODEL_CONFIG]["filters"] == [4, 8] and tuned[contract.CHECKPOINT_MODEL_CONFIG]["patch"] == [4, 16, 16]
    assert set(tuned["state_dict"]) == set(start)
    # One step at a negligible learning rate: the weights are the checkpoint's, up to that step.
    for key, value in start.items():
        if value.is_floating_point():
            torch.testing.assert_close(tuned["state_dict"][key], value, rtol=0, atol=1e-6)
    scratch, _ = train_model([blob_volume(2)], [], validated(TINY, learning_rate=1e-9, warmup_iterations=0, iterations=1), progress=False)
    assert any(not torch.allclose(scratch["state_dict"][k], v, atol=1e-3) for k, v in start.items() if v.is_floating_point())
    # The same seed and checkpoint give the same bytes.
    again, _ = train_model([blob_volume(2)], [], cfg, progress=False, voxel_size=[40, 8, 8])
    assert contract.checkpoint_bytes(again) == contract.checkpoint_bytes(tuned)
    assert tuned[contract.CHECKPOINT_TRAIN_CONFIG]["init_from"] == str(pretrained)


@pytest.mark.bad_input
def test_a_user_set_model_key_that_contradicts_the_init_checkpoint_is_one_line(pretrained):
    cfg = validated({"filters": [8, 16]}, init_from=str(pretrained))
    with pytest.raises(EmmitoError) as error:
        train_model([blob_volume(2)], [], cfg, progress=False)
    assert str(error.value) == (
        f"train.init_from {pretrained} was trained with model.filters=[4,8], the config says [8,16]: "
        "retrain or fix the config (drop model.filters: the checkpoint carries it)"
    )
    # The same value set explicitly agrees; a patch that fits the network may be set; one that does not is named.
    train_model([blob_volume(2)], [], validated({"filters": [4, 8], "patch": [2, 16, 16]}, init_from=str(pretrained)), progress=False)
    with pytest.raises(EmmitoError, match=r"model\.patch is \[4, 15, 16\], but a U-Net with 2 levels"):
        train_model([blob_volume(2)], [], validated({"patch": [4, 15, 16]}, init_from=str(pretrained)), progress=False)
    with pytest.raises(EmmitoError, match=r"checkpoint not found"):
        train_model([blob_volume(2)], [], validated(init_from=str(pretrained) + ".missing"), progress=False)


def test_freeze_encoder_trains_only_the_decoder_path(pretrained):
    cfg = validated(init_from=str(pretrained), freeze="encoder", iterations=3, learning_rate=0.01)
    tuned, _ = train_model([blob_volume(2)], [], cfg, progress=False, voxel_size=[40, 8, 8])
    start = contract.read_checkpoint(pretrained)[contract.CHECKPOINT_STATE]
    encoder = [k for k in start if k.startswith(("stem.", "encoders."))]
    decoder = [k for k in start if k.startswith(("ups.", "decoders.", "head."))]
    assert encoder and decoder
    assert all(torch.equal(tuned["state_dict"][k], start[k]) for k in encoder)
    assert any(not torch.equal(tuned["state_dict"][k], start[k]) for k in decoder if start[k].is_floating_point())
    with pytest.raises(EmmitoError, match="train.freeze encoder needs train.init_from"):
        train_model([blob_volume(2)], [], validated(TINY, freeze="encoder"), progress=False)


def test_fine_tuning_pools_new_images_to_the_checkpoints_voxel_size(pretrained, monkeypatch):
    seen = []
    original = PatchSampler.__init__

    def spy(self, volumes, *args, **kwargs):
        seen.extend(v[0].shape for v in volumes)
        original(self, volumes, *args, **kwargs)

    monkeypatch.setattr(PatchSampler, "__init__", spy)
    cfg = validated(init_from=str(pretrained), iterations=1)
    tuned, _ = train_model([blob_volume(2, shape=(8, 64, 64))], [], cfg, progress=False, voxel_size=[40, 4, 4])
    assert seen == [(8, 32, 32)]  # 4 nm images pooled by 2 to the 8 nm the network was trained at
    assert tuned[contract.CHECKPOINT_DOWNSAMPLE_XY] == 2 and tuned[contract.CHECKPOINT_VOXEL_SIZE] == [40.0, 8.0, 8.0]
    with pytest.raises(EmmitoError, match=r"a training image has 40x12x12 nm voxels but .* was trained on 40x8x8 nm voxels"):
        train_model([blob_volume(2)], [], cfg, progress=False, voxel_size=[40, 12, 12])


def test_resume_works_when_fine_tuning(tmp_path, pretrained):
    cfg = validated(init_from=str(pretrained), iterations=4, warmup_iterations=2, save_every=1)
    whole, _ = train_model([blob_volume(2)], [], cfg, progress=False)
    state = tmp_path / "ckpt.pt.resume"
    train_model([blob_volume(2)], [], cfg, progress=False, resume_path=state, stop_after=2)
    resumed, _ = train_model([blob_volume(2)], [], cfg, progress=False, resume_path=state)
    assert contract.checkpoint_bytes(resumed) == contract.checkpoint_bytes(whole)


@pytest.mark.bad_input
def test_training_images_at_two_voxel_sizes_are_refused(tmp_path):
    args = cli_args(tmp_path)
    image, label = blob_volume(1)
    fixture(tmp_path / "coarse.h5", "image", image, voxel_size=[40, 16, 16])
    fixture(tmp_path / "coarse_label.h5", "label", label, voxel_size=[40, 16, 16])
    args.val = [[tmp_path / "coarse.h5", tmp_path / "coarse_label.h5"]]
    with pytest.raises(EmmitoError, match=r"coarse\.h5 has voxels of 40x16x16 nm but .*image\.h5 of 40x8x8 nm: a model trains at one"):
        run_cli(args, params())
    assert not args.checkpoint.exists()
