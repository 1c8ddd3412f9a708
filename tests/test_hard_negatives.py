"""Hard-negative mining (train.hard_negatives): where the model is confidently wrong on its training volumes.

Every ``every`` iterations the model predicts its training volumes; background
voxels it calls foreground with probability >= ``threshold`` become patch centres
for a ``fraction`` of the samples. Until the first mining the batches are the plain
sampler's; a run stopped at any iteration (a mining one included) and resumed ends
with the uninterrupted run's bytes.
"""

from __future__ import annotations

import numpy as np
import torch
from test_train import blob_volume, params

from emmito import contract
from emmito.model import build_model
from emmito.prediction import DEFAULT_INPUT_NORM, predict_volume
from emmito.train import PatchSampler, mine_hard_negatives, mining_settings, sample_generator, train_model

HARD = {"fraction": 0.5, "every": 2, "threshold": 0.3}


def test_mining_keeps_the_background_voxels_called_foreground():
    cfg = params()
    torch.manual_seed(0)
    model = build_model(cfg["model"]).eval()
    image, label = blob_volume(0)
    sampler = PatchSampler([(image, label)], [4, 16, 16], 0.5)
    settings = mining_settings(cfg["model"], cfg["train"])
    (hard,) = mine_hard_negatives(model, sampler, settings, 0.3, torch.device("cpu"), dict(DEFAULT_INPUT_NORM))
    assert model.training  # put back in training mode
    with torch.no_grad():
        probability = predict_volume(model, image, settings, "cpu", dict(DEFAULT_INPUT_NORM))[0]
    expected = np.flatnonzero((probability >= 0.3) & (label == 0))
    assert hard.size > 0 and np.array_equal(hard, expected)
    assert not label.reshape(-1)[hard].any()  # background only


def test_a_hard_sample_is_centred_on_a_mined_voxel():
    image, label = blob_volume(0)
    sampler = PatchSampler([(image, label)], [4, 16, 16], 0.5)
    plain = sampler.sample(sample_generator(0, 1, 0))
    sampler.hard_fraction = 1.0
    assert all(np.array_equal(a, b) for a, b in zip(sampler.sample(sample_generator(0, 1, 0)), plain))  # nothing mined yet
    corner = np.ravel_multi_index((0, 0, 0), image.shape)
    sampler.hard = [np.array([corner])]
    patch, _ = sampler.sample(sample_generator(0, 1, 0))
    assert np.array_equal(patch, image[:4, :16, :16])  # the patch holds the mined voxel (clipped to the volume)


def test_mining_changes_the_batches_only_after_it_and_resumes_exactly(tmp_path):
    cfg = {"iterations": 6, "warmup_iterations": 2, "save_every": 1, "hard_negatives": HARD}
    volumes = [blob_volume(0), blob_volume(2)]
    whole, metrics = train_model(volumes, [], params(**cfg), progress=False)
    _, plain = train_model(volumes, [], params(**{**cfg, "hard_negatives": {**HARD, "fraction": 0.0}}), progress=False)
    losses, plain_losses = [m["loss"] for m in metrics], [m["loss"] for m in plain]
    assert losses[:2] == plain_losses[:2] and losses[2:] != plain_losses[2:]
    for stop in (3, 4):  # 4: a mining iteration, its state saved before the mining
        state = tmp_path / f"stop{stop}.resume"
        train_model(volumes, [], params(**cfg), progress=False, resume_path=state, stop_after=stop)
        saved = torch.load(state, map_location="cpu", weights_only=False)
        assert saved["hard_negatives_mined_at"] in (2, 4)
        resumed, _ = train_model(volumes, [], params(**cfg), progress=False, resume_path=state)
        assert contract.checkpoint_bytes(resumed) == contract.checkpoint_bytes(whole)
