"""The masked loss of partly labelled training volumes (a proofread crop and its valid mask).

Unlabelled voxels are not background: whatever the labels say there, the loss
and every gradient are the same to the bit; with every voxel valid the masked
loss is the plain one; patches are centred on valid voxels; a partly labelled
label.h5 is read in its box and a margin of tissue, not whole.
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emmito import contract
from emmito.config import section_defaults
from emmito.embedding import build_support_set
from emmito.io import EmmitoError, create_volume
from emmito.losses import TrainingLoss, dice_loss, ohem_bce, ohem_mse, weighted_bce
from emmito.model import build_model
from emmito.train import PatchSampler, _load_pair, assemble_batch, train_model

TINY = dict(filters=[4, 8], conv3d_from_level=1, pool_z_from_level=1, patch=[4, 16, 16])
EVERY_TERM = {"bce": 1.0, "dice": 1.0, "ohem_bce": 0.5, "mse": 0.3, "ohem_mse": 0.2}
SHAPE = (2, 4, 8, 8)  # batch, z, y, x


def train_cfg(target: str, **extra) -> dict:
    cfg = {**section_defaults("train"), "aux_loss_weight": 0.25, **extra}
    cfg["loss_weights"] = {**cfg["loss_weights"], target: dict(EVERY_TERM)}
    return cfg


def random_target(target: str, generator: torch.Generator) -> torch.Tensor:
    channels = {"binary": 1, "binary_contour": 2, "skeleton_distance": 1}[target]
    if target == "skeleton_distance":
        return torch.rand(SHAPE[0], channels, *SHAPE[1:], generator=generator) * 2 - 1
    return (torch.rand(SHAPE[0], channels, *SHAPE[1:], generator=generator) > 0.6).float()


def loss_and_gradients(loss: TrainingLoss, logits: torch.Tensor, aux: torch.Tensor, target: torch.Tensor):
    logits, aux = logits.clone().requires_grad_(), aux.clone().requires_grad_()
    parts = loss(logits, [aux], target)
    parts.loss.backward()
    return parts.loss.detach(), logits.grad, aux.grad


@pytest.mark.parametrize("target", ["binary", "binary_contour", "skeleton_distance"])
@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("embedding", [0, 3])
def test_labels_at_masked_voxels_leave_the_loss_and_its_gradients_bit_identical(target, balance, embedding):
    generator = torch.Generator().manual_seed(1)
    cfg = train_cfg(target, bce_class_balance=balance)
    labels = random_target(target, generator)
    out_channels = labels.shape[1] + embedding
    logits = torch.randn(SHAPE[0], out_channels, *SHAPE[1:], generator=generator)
    aux = torch.randn(SHAPE[0], out_channels, *SHAPE[1:], generator=generator)
    valid = (torch.rand(SHAPE[0], 1, *SHAPE[1:], generator=generator) > 0.45).float()
    ids = torch.randint(0, 4, (SHAPE[0], 1, *SHAPE[1:]), generator=generator).float()
    channels = [labels, ids] if embedding else [labels]
    first = torch.cat([*channels, valid], 1)
    # Other labels wherever the mask is 0: random values, other ids, foreground everywhere.
    other_labels = random_target(target, generator) + 0.5
    other_ids = torch.randint(4, 9, ids.shape, generator=generator).float()
    masked = valid == 0
    changed = [torch.where(masked, other_labels, labels)] + ([torch.where(masked, other_ids, ids)] if embedding else [])
    second = torch.cat([*changed, valid], 1)
    assert not torch.equal(first, second)

    loss = TrainingLoss(target, cfg, embedding, masked=True)
    a, b = loss_and_gradients(loss, logits, aux, first), loss_and_gradients(loss, logits, aux, second)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    loss_value, logits_grad, aux_grad = a
    assert torch.isfinite(loss_value) and float(loss_value) > 0
    assert torch.all(logits_grad[masked.expand_as(logits_grad)] == 0) and torch.any(logits_grad != 0)
    assert torch.all(aux_grad[masked.expand_as(aux_grad)] == 0)
    # The unmasked loss does see those labels.
    plain = TrainingLoss(target, cfg, embedding)
    assert not torch.equal(loss_and_gradients(plain, logits, aux, first[:, :-1])[0], loss_and_gradients(plain, logits, aux, second[:, :-1])[0])


@pytest.mark.parametrize("target", ["binary", "skeleton_distance"])
def test_an_all_valid_mask_gives_the_plain_loss(target):
    generator = torch.Generator().manual_seed(2)
    cfg = train_cfg(target)
    labels = random_target(target, generator)
    logits = torch.randn(SHAPE[0], 1, *SHAPE[1:], generator=generator)
    aux = torch.randn(SHAPE[0], 1, *SHAPE[1:], generator=generator)
    masked = TrainingLoss(target, cfg, masked=True)(logits, [aux], torch.cat([labels, torch.ones_like(labels)], 1)).loss
    plain = TrainingLoss(target, cfg)(logits, [aux], labels).loss
    assert torch.allclose(masked, plain, rtol=1e-5, atol=1e-6), (float(masked), float(plain))


def test_each_masked_term_is_the_plain_term_of_the_valid_voxels():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(200, generator=generator)
    target = (torch.rand(200, generator=generator) > 0.7).float()
    valid = torch.rand(200, generator=generator) > 0.3
    inside_logits, inside_target = logits[valid], target[valid]
    for balance in (True, False):
        assert torch.allclose(weighted_bce(logits, target, balance, valid), weighted_bce(inside_logits, inside_target, balance), atol=1e-6)
    p = torch.sigmoid(logits)
    assert torch.allclose(dice_loss(p, target, valid=valid), dice_loss(p[valid], inside_target), atol=1e-6)
    assert torch.allclose(ohem_mse(p, target, 0.25, valid), ohem_mse(p[valid], inside_target, 0.25), atol=1e-6)
    masked_ohem, cut, kept = ohem_bce(logits, target, 0.7, 0.25, valid)
    plain_ohem, plain_cut, plain_kept = ohem_bce(inside_logits, inside_target, 0.7, 0.25)
    assert kept == plain_kept and torch.equal(cut, plain_cut) and torch.allclose(masked_ohem, plain_ohem, atol=1e-6)
    # A patch with no valid voxel adds 0, not NaN.
    none = torch.zeros(200, dtype=torch.bool)
    assert float(weighted_bce(logits, target, True, none)) == 0.0 and float(ohem_mse(p, target, 0.25, none)) == 0.0
    # Class balance counts the valid voxels only: a background-only mask is not "all background" of the whole.
    assert not torch.allclose(weighted_bce(logits, target, True, valid), weighted_bce(logits, target, True))
    assert torch.allclose(weighted_bce(logits, target, False, None), F.binary_cross_entropy_with_logits(logits, target))


def blob_volume(shape=(8, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    z, y, x = np.indices(shape)
    label = np.zeros(shape, np.uint32)
    for index, (cz, cy, cx) in enumerate([(4, 8, 8), (4, 8, 17), (4, 24, 22)], start=1):
        inside = ((z - cz) / 3) ** 2 + ((y - cy) / 5) ** 2 + ((x - cx) / 5) ** 2 <= 1
        label[inside & (label == 0)] = index
    image = np.clip(np.where(label > 0, 170, 80) + rng.normal(0, 12, shape), 0, 255).astype(np.uint8)
    return image, label


def train_params(**train) -> dict:
    return {
        "seed": 0,
        "model": {**section_defaults("model"), **TINY},
        "train": {**section_defaults("train"), "iterations": 2, "batch_size": 2, "warmup_iterations": 1, "threads": 1, **train},
    }


def parameter_gradients(volumes: list, params: dict) -> list[torch.Tensor]:
    """One batch (augmented) drawn from ``volumes`` through a fixed network: every weight's gradient."""
    model_cfg, cfg = params["model"], params["train"]
    sampler = PatchSampler(volumes, model_cfg["patch"], cfg["foreground_fraction"], model_cfg["target"], model_cfg["contour_width"])
    torch.manual_seed(0)
    model = build_model(model_cfg).train()
    inputs, targets = assemble_batch(sampler, 0, 1, range(2), cfg, {"mean": 128.0, "std": 64.0})
    logits, aux = model.forward_with_aux(inputs)
    TrainingLoss(model_cfg["target"], cfg, masked=sampler.masked)(logits, aux, targets).loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("target", ["binary", "binary_contour", "skeleton_distance"])
def test_a_whole_step_from_a_partly_labelled_volume_ignores_the_labels_outside_the_mask(target):
    """Sampling, targets, augmentation, network, loss: labels outside the mask change no gradient by a bit."""
    image, label = blob_volume()
    valid = np.zeros(label.shape, bool)
    valid[:, 4:28, 2:20] = True  # cuts through the first two blobs (touching each other) and the third
    other = label.copy()
    other[~valid] = 7  # "everything unlabelled is a mitochondrion", touching the labelled ones
    other[~valid & (np.indices(label.shape)[2] > 25)] = 0
    params = train_params(foreground_fraction=0.5)
    params["model"]["target"] = target
    assert params["train"]["augment"]
    grads = [parameter_gradients([(image, lab, valid)], params) for lab in (label, other)]
    assert len(grads[0]) > 4 and any(bool(g.abs().sum() > 0) for g in grads[0])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    # Without the mask those labels are training data.
    plain = [parameter_gradients([(image, lab)], params) for lab in (label, other)]
    assert not all(torch.equal(a, b) for a, b in zip(*plain))


def test_a_contour_target_ignores_a_band_along_the_mask_edge():
    image, label = blob_volume()
    valid = np.zeros(label.shape, bool)
    valid[:, :, :12] = True  # cuts the first blob (x 3-13) at x 12
    sampler = PatchSampler([(image, label, valid)], TINY["patch"], 0.5, "binary_contour", 1)
    mask = sampler.volumes[0][1][-1]
    assert mask[:, :, :10].all() and not mask[:, :, 10:].any()  # the band: contour_width + 1 = 2 px
    # The labels beyond x 12 are not read: no contour past the cut's own (x 11, dilated by 1 px).
    contour = sampler.volumes[0][1][1]
    assert contour[:, :, 11].any() and not contour[:, :, 13:].any()


def test_patches_are_centred_on_valid_voxels_and_volumes_drawn_by_their_valid_share():
    image, label = blob_volume()
    valid = np.zeros(label.shape, bool)
    valid[2:4, 20:24, 24:30] = True  # 48 voxels, away from every blob but the third
    sampler = PatchSampler([(image, label, valid), (image, label)], TINY["patch"], 0.0)
    assert sampler.masked and sampler.volume_probability[0] == pytest.approx(48 / (48 + label.size))
    rng = np.random.default_rng(0)
    for _ in range(40):
        _, target = sampler.sample(rng)
        assert target.shape == (2, *TINY["patch"]) and target[-1].any()  # the mask channel: never an all-unlabelled patch
    alone = PatchSampler([(image, label, valid)], TINY["patch"], 1.0)
    assert alone.foreground[0].size == np.count_nonzero(valid & (label > 0))
    with pytest.raises(EmmitoError, match="no training volume has a labelled voxel"):
        PatchSampler([(image, label, np.zeros(label.shape, bool))], TINY["patch"], 0.5)


def test_without_any_mask_the_sampler_and_checkpoint_are_unchanged():
    image, label = blob_volume()
    a, _ = train_model([(image, label)], [], train_params(), device="cpu", progress=False)
    b, _ = train_model([(image, label, None)], [], train_params(), device="cpu", progress=False)
    assert all(torch.equal(a[contract.CHECKPOINT_STATE][k], b[contract.CHECKPOINT_STATE][k]) for k in a[contract.CHECKPOINT_STATE])
    assert not PatchSampler([(image, label)], TINY["patch"], 0.5).masked


def test_fine_tuning_on_a_partly_labelled_volume_runs_and_differs_from_counting_unlabelled_as_background():
    image, label = blob_volume()
    valid = np.zeros(label.shape, bool)
    valid[:, :16, :] = True
    masked, _ = train_model([(image, label, valid)], [], train_params(), device="cpu", progress=False)
    zeroed = np.where(valid, label, 0).astype(np.uint32)
    plain, _ = train_model([(image, zeroed)], [], train_params(), device="cpu", progress=False)
    state_a, state_b = masked[contract.CHECKPOINT_STATE], plain[contract.CHECKPOINT_STATE]
    assert any(not torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_the_support_set_draws_no_unlabelled_voxel():
    embeddings = np.arange(2 * 4 * 4 * 4, dtype=np.float32).reshape(2, 4, 4, 4)
    classes = np.zeros((4, 4, 4), np.int64)
    classes[0] = 1
    classes[3] = -1
    features, drawn = build_support_set(embeddings, classes, 64, 0)
    # 32 per class: all 16 of class 1, 32 of the 32 of class 0, none of the 16 unlabelled (z 3: features 48-63, 112-127).
    assert sorted(drawn.tolist()) == [0] * 32 + [1] * 16
    assert features[:, 0].max() < 48


def write_partial(tmp_path, shape=(12, 40, 48), box=(4, 10, 12, 8, 30, 40)):
    image = (np.arange(np.prod(shape)) % 251).astype(np.uint8).reshape(shape)
    label = np.zeros(shape, np.uint32)
    z0, y0, x0, z1, y1, x1 = box
    label[z0:z1, y0:y1, x0:x1] = 3
    image_path, label_path = tmp_path / "image.h5", tmp_path / "label.h5"
    with create_volume(image_path, shape, np.uint8, voxel_size=[40, 8, 8]) as ds:
        ds[...] = image
    with create_volume(label_path, shape, np.uint32, voxel_size=[40, 8, 8], attrs={contract.VALID_BOX: list(box)}) as ds:
        ds[...] = label
        mask = np.zeros(shape, np.uint8)
        mask[z0:z1, y0:y1, x0:x1] = 1
        ds.file.create_dataset(contract.VALID_MASK, data=mask)
    return image, label, image_path, label_path


def test_a_partly_labelled_pair_is_read_in_its_box_and_a_margin_of_tissue(tmp_path):
    image, label, image_path, label_path = write_partial(tmp_path)
    crop_image, crop_label, voxel_size, mask = _load_pair(image_path, label_path, context=(2, 5, 5), align=2)
    # z 4-8 grown by 2; y 10-30 by 5 (5 rounded down to 4 by align 2); x 12-40 by 5 (7 -> 6; 45 clipped at 48 is 45).
    window = (slice(2, 10), slice(4, 35), slice(6, 45))
    assert crop_image.shape == (8, 31, 39) and np.array_equal(crop_image, image[window])
    assert np.array_equal(crop_label, label[window]) and voxel_size == [40.0, 8.0, 8.0]
    assert mask.dtype == np.uint8 and int(mask.sum()) == 4 * 20 * 28 and mask[0].sum() == 0
    with h5py.File(label_path, "r") as f:
        assert f[contract.DATASET].shape == image.shape
    # A fully labelled pair: read whole, no mask.
    plain = tmp_path / "plain.h5"
    with create_volume(plain, image.shape, np.uint32, voxel_size=[40, 8, 8]) as ds:
        ds[...] = label
    whole = _load_pair(image_path, plain)
    assert whole[0].shape == image.shape and whole[3] is None


def test_train_files_fine_tunes_on_a_partly_labelled_pair(tmp_path, monkeypatch):
    """The train job's path: a proofread crop's label.h5 (valid mask) is read in its box, the loss masked."""
    from emmito.config import validate_sections
    from emmito.train import train_files

    image, label, image_path, label_path = write_partial(tmp_path, shape=(20, 80, 80), box=(6, 30, 30, 10, 50, 50))
    seen = {}
    real = train_model

    def spy(volumes, *args, **kwargs):
        seen["volumes"] = volumes
        return real(volumes, *args, **kwargs)

    monkeypatch.setattr("emmito.train.train_model", spy)
    base = validate_sections({"seed": 0, "model": dict(TINY), "train": {"iterations": 2, "batch_size": 2, "threads": 1, "workers": 0}})
    train_files([(image_path, plain_label(tmp_path, label))], [], tmp_path / "base.pt", tmp_path / "base.jsonl", None, base)
    params = validate_sections({"seed": 0, "model": {}, "train": {"iterations": 2, "batch_size": 2, "threads": 1, "workers": 0,
                                                                  "init_from": str(tmp_path / "base.pt")}})
    train_files([(image_path, label_path)], [], tmp_path / "tuned.pt", tmp_path / "tuned.jsonl", None, params)
    crop_image, crop_label, mask = seen["volumes"][0]
    # The box 6-10 x 30-50 x 30-50 and a patch (4, 16, 16) of context on each side: not the whole 20 x 80 x 80.
    assert crop_image.shape == crop_label.shape == mask.shape == (12, 52, 52)
    assert np.array_equal(crop_image, image[2:14, 14:66, 14:66]) and np.array_equal(crop_label, label[2:14, 14:66, 14:66])
    assert int(mask.sum()) == 4 * 20 * 20 and tmp_path.joinpath("tuned.pt").exists()
    with pytest.raises(EmmitoError, match="labelled only in part"):
        train_files([(image_path, plain_label(tmp_path, label))], [(image_path, label_path)], tmp_path / "x.pt",
                    tmp_path / "x.jsonl", None, base)


def plain_label(tmp_path, label):
    path = tmp_path / "plain_label.h5"
    if not path.exists():
        with create_volume(path, label.shape, np.uint32, voxel_size=[40, 8, 8]) as ds:
            ds[...] = label
    return path
