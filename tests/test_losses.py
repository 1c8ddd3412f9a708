"""Losses on small tensors: balanced BCE, Dice, MSE, the OHEM definitions (kept count, threshold), the training loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from emmito.config import section_defaults
from emmito.losses import (
    TrainingLoss,
    discriminative_loss,
    dice_loss,
    kept_count,
    ohem_bce,
    ohem_mse,
    ohem_threshold,
    target_loss,
    weighted_bce,
)


def test_class_balanced_bce_weighs_each_class_half():
    target = torch.tensor([1.0, 0.0, 0.0, 0.0])
    logits = torch.tensor([0.0, 0.0, 0.0, 0.0])
    # Every voxel's BCE is log 2; weights 0.5/0.25 = 2 for the positive and 0.5/0.75 for negatives average to 1.
    assert weighted_bce(logits, target, True).item() == pytest.approx(math.log(2))
    logits = torch.tensor([-1.0, -3.0, -3.0, -3.0])
    plain = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    expected = (2.0 * plain[0] + (2 / 3) * plain[1:].sum()) / 4
    assert weighted_bce(logits, target, True).item() == pytest.approx(expected.item())
    assert weighted_bce(logits, target, False).item() == pytest.approx(plain.mean().item())


def test_dice_is_zero_for_a_perfect_and_near_one_for_a_disjoint_prediction():
    target = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert dice_loss(target.clone(), target).item() == pytest.approx(0.0)
    assert dice_loss(torch.tensor([0.0, 0.0, 1.0, 1.0]), target).item() == pytest.approx(1 - 1 / 5)


def test_ohem_mse_keeps_the_top_k_squared_errors():
    prediction = torch.tensor([0.0, 0.1, 0.5, -1.0, 0.2, 0.0, 0.0, 0.9])
    target = torch.zeros(8)
    assert kept_count(8, 0.25) == 2 and kept_count(8, 0.3) == 3 and kept_count(8, 1e-9) == 1
    # The two hardest: 1.0 and 0.81.
    assert ohem_mse(prediction, target, 0.25).item() == pytest.approx((1.0 + 0.81) / 2)
    assert ohem_mse(prediction, target, 1.0).item() == pytest.approx(prediction.square().mean().item())


def test_ohem_bce_threshold_is_the_larger_of_thresh_and_the_kth_probability():
    truth = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    logits = torch.tensor([3.0, 0.0, -2.0, -3.0, -1.0, 2.0, -4.0, -0.5])
    p = torch.sigmoid(logits)
    true_p = torch.where(truth > 0.5, p, 1 - p)
    # keep fraction 0.5 -> min_kept 4; 4th smallest true-class probability vs thresh 0.1: the rank wins.
    sorted_p = true_p.sort().values
    loss, cut, kept = ohem_bce(logits, truth, threshold=0.1, keep_fraction=0.5)
    assert cut.item() == pytest.approx(sorted_p[3].item())
    assert kept == 4
    per_voxel = F.binary_cross_entropy_with_logits(logits, truth, reduction="none")
    assert loss.item() == pytest.approx(per_voxel[true_p <= sorted_p[3]].mean().item())
    # A high thresh wins over the rank: every voxel predicted worse than 0.9 is kept.
    loss, cut, kept = ohem_bce(logits, truth, threshold=0.9, keep_fraction=0.25)
    assert cut.item() == pytest.approx(0.9) and kept == int((true_p <= 0.9).sum()) == 5
    assert ohem_threshold(true_p, 0.0, 1).item() == pytest.approx(true_p.min().item())


def test_target_loss_combines_weights_per_target():
    cfg = section_defaults("train")
    logits = torch.zeros(1, 2, 1, 2, 2)
    target = torch.ones(1, 2, 1, 2, 2)
    # bce (unbalanced here: positive share clamps to 0.99) + dice per channel.
    per_channel = weighted_bce(logits[:, 0], target[:, 0], True) + dice_loss(torch.sigmoid(logits[:, 0]), target[:, 0])
    assert target_loss(logits, target, "binary_contour", cfg).item() == pytest.approx(2 * per_channel.item())
    cfg = {**cfg, "loss_weights": {**cfg["loss_weights"], "skeleton_distance": {"mse": 2.0}}}
    skeleton = torch.full((1, 1, 1, 2, 2), 0.5)
    assert target_loss(torch.zeros(1, 1, 1, 2, 2), skeleton, "skeleton_distance", cfg).item() == pytest.approx(2 * 0.25)


def test_training_loss_adds_deep_supervision_and_the_discriminative_terms():
    cfg = {**section_defaults("train"), "aux_loss_weight": 0.25}
    torch.manual_seed(0)
    logits, aux = torch.randn(2, 1, 2, 4, 4), [torch.randn(2, 1, 2, 4, 4)]
    target = (torch.rand(2, 1, 2, 4, 4) > 0.5).float()
    parts = TrainingLoss("binary", cfg)(logits, aux, target)
    expected = target_loss(logits, target, "binary", cfg) + 0.25 * target_loss(aux[0], target, "binary", cfg)
    assert torch.equal(parts.loss, expected) and parts.terms == {} and parts.logits is logits
    # An embedding head: the last 3 output channels are the embedding, the last target channel the instance ids.
    embedding = torch.randn(2, 3, 2, 4, 4)
    ids = torch.randint(0, 3, (2, 1, 2, 4, 4)).float()
    weights = cfg["discriminative"]
    parts = TrainingLoss("binary", cfg, 3)(torch.cat([logits, embedding], 1), [torch.cat([aux[0], embedding], 1)], torch.cat([target, ids], 1))
    pull_push, terms = discriminative_loss(
        embedding, ids[:, 0].long(), weights["delta_var"], weights["delta_dist"], weights["gamma"], background=weights["background_cluster"]
    )
    target_part = weights["target_weight"] * target_loss(logits, target, "binary", cfg)
    target_part = target_part + weights["target_weight"] * 0.25 * target_loss(aux[0], target, "binary", cfg)
    assert torch.equal(parts.loss, target_part + weights["weight"] * pull_push)
    assert set(parts.terms) == {"var", "dist", "reg"} and torch.equal(parts.target, target)
    assert parts.logits.shape[1] == 1 and parts.aux[0].shape[1] == 1


@pytest.mark.parametrize("threshold", [0.0, 0.7, 1.0])
def test_ohem_bce_is_the_mean_bce_over_the_kept_voxels_with_its_gradient(threshold):
    """Both ways to the cut (the threshold when enough voxels are below it, else the k-th value) give the definition."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 4, 8, 8)).requires_grad_()
    target = (torch.rand(2, 4, 8, 8) > 0.7).float()
    p = torch.sigmoid(logits.detach())
    true_p = torch.where(target > 0.5, p, 1 - p).flatten()
    k = kept_count(true_p.numel(), 0.25)
    cut = torch.maximum(torch.kthvalue(true_p, k).values, torch.tensor(threshold))
    keep = true_p <= cut
    assert (int((true_p <= threshold).sum()) >= k) == (threshold > 0)  # 0: the k-th value is the cut; else the threshold
    expected = F.binary_cross_entropy_with_logits(logits.flatten()[keep], target.flatten()[keep])
    loss, got_cut, kept = ohem_bce(logits, target, threshold, 0.25)
    assert got_cut.item() == cut.item() and kept == int(keep.sum())
    torch.testing.assert_close(loss, expected)
    (expected_gradient,) = torch.autograd.grad(expected, logits)
    (gradient,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(gradient, expected_gradient)
