"""Losses on network logits (batch, channel, z, y, x) against float targets of the same shape.

``bce`` (optionally class-balanced) and ``dice`` for binary channels; ``mse``,
``ohem_mse`` and ``ohem_bce`` (the original pipeline's online hard example
mining) for the skeleton-distance regression, where the prediction is
tanh(logits) in [-1, 1]. ``target_loss`` combines them with per-target weights
from ``train.loss_weights``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

LOSS_NAMES = ("bce", "dice", "mse", "ohem_mse", "ohem_bce")


def weighted_bce(logits: torch.Tensor, target: torch.Tensor, class_balance: bool = True) -> torch.Tensor:
    """BCE-with-logits; with ``class_balance`` each class weighs half whatever its voxel share (``target`` float 0/1)."""
    if not class_balance:
        return F.binary_cross_entropy_with_logits(logits, target)
    positive = target.mean().clamp(0.01, 0.99)
    weight = torch.where(target > 0.5, 0.5 / positive, 0.5 / (1.0 - positive))
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight)


def dice_loss(probability: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole tensor; ``probability`` and ``target`` in [0, 1]."""
    intersection = (probability * target).sum()
    return 1.0 - (2.0 * intersection + smooth) / (probability.sum() + target.sum() + smooth)


def mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error."""
    return F.mse_loss(prediction, target)


def kept_count(voxels: int, keep_fraction: float) -> int:
    """How many voxels OHEM keeps out of ``voxels``: ceil(fraction * voxels), at least 1."""
    return max(1, min(voxels, math.ceil(keep_fraction * voxels)))


def ohem_mse(prediction: torch.Tensor, target: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Mean of the top-k squared errors, k = ``kept_count(numel, keep_fraction)`` (the hardest voxels only)."""
    errors = (prediction - target).square().flatten()
    hardest = torch.topk(errors, kept_count(errors.numel(), keep_fraction), sorted=False).values
    return hardest.mean()


def ohem_threshold(probability_of_truth: torch.Tensor, threshold: float, min_kept: int) -> torch.Tensor:
    """The OHEM-BCE cut: max(``threshold``, the ``min_kept``-th smallest probability of the true class).

    Voxels whose true-class probability is below the cut are kept, so at least
    ``min_kept`` voxels (up to ties) are kept, and every voxel predicted worse than ``threshold``.
    """
    flat = probability_of_truth.flatten()
    k = max(1, min(int(min_kept), flat.numel()))
    kth = torch.kthvalue(flat, k).values
    return torch.maximum(kth, torch.tensor(threshold, dtype=flat.dtype, device=flat.device))


def ohem_bce(
    logits: torch.Tensor, target: torch.Tensor, threshold: float, keep_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """OHEM binary cross-entropy: mean BCE over voxels whose true-class probability is <= the OHEM cut.

    ``target`` float 0/1. min_kept = ``kept_count(numel, keep_fraction)``.
    Returns (loss, the cut, number of voxels kept).
    """
    probability = torch.sigmoid(logits)
    probability_of_truth = torch.where(target > 0.5, probability, 1.0 - probability).detach()
    cut = ohem_threshold(probability_of_truth, threshold, kept_count(probability_of_truth.numel(), keep_fraction))
    keep = probability_of_truth <= cut
    losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    kept = int(keep.sum())
    return losses[keep].sum() / max(kept, 1), cut, kept


def _binary_terms(
    logits: torch.Tensor, target: torch.Tensor, weights: dict[str, float], balance: bool, threshold: float, keep_fraction: float
) -> torch.Tensor:
    """The weighted bce + dice + ohem_bce terms of one binary channel (``logits`` float, ``target`` 0/1)."""
    total = logits.new_zeros(())
    if weights.get("bce", 0):
        total = total + weights["bce"] * weighted_bce(logits, target, balance)
    if weights.get("dice", 0):
        total = total + weights["dice"] * dice_loss(torch.sigmoid(logits), target)
    if weights.get("ohem_bce", 0):
        total = total + weights["ohem_bce"] * ohem_bce(logits, target, threshold, keep_fraction)[0]
    return total


def target_loss(logits: torch.Tensor, target: torch.Tensor, target_kind: str, train_cfg: dict[str, Any]) -> torch.Tensor:
    """The weighted sum of losses for ``target_kind`` (weights: ``train_cfg["loss_weights"][target_kind]``).

    ``logits`` and ``target``: float (batch, channel, z, y, x). Binary targets
    get bce/dice (and ohem_bce) on each channel; ``skeleton_distance`` compares
    tanh(logits) with the target by mse/ohem_mse, and ohem_bce/bce/dice on the
    foreground (target > 0).
    """
    weights = train_cfg["loss_weights"][target_kind]
    keep_fraction, threshold = train_cfg["ohem_keep_fraction"], train_cfg["ohem_threshold"]
    balance = train_cfg["bce_class_balance"]
    total = logits.new_zeros(())
    if target_kind == "skeleton_distance":
        prediction = torch.tanh(logits)
        foreground = (target > 0).to(logits.dtype)
        if weights.get("mse", 0):
            total = total + weights["mse"] * mse_loss(prediction, target)
        if weights.get("ohem_mse", 0):
            total = total + weights["ohem_mse"] * ohem_mse(prediction, target, keep_fraction)
        # The foreground terms read tanh as a probability: (tanh + 1) / 2 = sigmoid(2 * logits).
        return total + _binary_terms(2.0 * logits, foreground, weights, balance, threshold, keep_fraction)
    for channel in range(logits.shape[1]):
        channel_logits, channel_target = logits[:, channel], target[:, channel]
        total = total + _binary_terms(channel_logits, channel_target, weights, balance, threshold, keep_fraction)
        if weights.get("mse", 0):
            total = total + weights["mse"] * mse_loss(torch.sigmoid(channel_logits), channel_target)
        if weights.get("ohem_mse", 0):
            total = total + weights["ohem_mse"] * ohem_mse(torch.sigmoid(channel_logits), channel_target, keep_fraction)
    return total
