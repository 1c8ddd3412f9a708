"""Losses on network logits (batch, channel, z, y, x) against float targets of the same shape.

``bce`` (optionally class-balanced) and ``dice`` for binary channels; ``mse``,
``ohem_mse`` and ``ohem_bce`` (the original pipeline's online hard example
mining) for the skeleton-distance regression, where the prediction is
tanh(logits) in [-1, 1]. ``target_loss`` combines them with per-target weights
from ``train.loss_weights``; ``TrainingLoss`` is what training minimises: the
target loss, the deep-supervision heads' and, for an embedding head, the
discriminative loss (De Brabandere et al., below).

Every loss takes an optional ``valid`` (bool, the shape of the target's
channel): the voxels whose labels are known (a proofread crop's mask,
``contract.VALID_MASK``). Unlabelled voxels are then not background: they add
nothing to any term (means, class balance, Dice sums, the OHEM selection and
its count, the discriminative clusters), and ``TrainingLoss`` replaces their
targets by a constant before any loss sees them, so that the labels there
cannot change the loss or its gradient by a single bit. ``valid`` None: every
voxel counts, by the same code as before masks existed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

LOSS_NAMES = ("bce", "dice", "mse", "ohem_mse", "ohem_bce")


def _valid_count(valid: torch.Tensor) -> torch.Tensor:
    """The number of valid voxels, at least 1 (a patch without any adds 0, not NaN), as a float scalar."""
    return valid.sum().clamp_min(1).to(torch.float32)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``values`` over all voxels, or over the ``valid`` ones (the others add an exact 0)."""
    if valid is None:
        return values.mean()
    return torch.where(valid, values, 0.0).sum() / _valid_count(valid)


def weighted_bce(
    logits: torch.Tensor, target: torch.Tensor, class_balance: bool = True, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """BCE-with-logits; with ``class_balance`` each class weighs half whatever its voxel share (``target`` float 0/1).

    With ``valid``: the mean and the class shares over the valid voxels only.
    """
    if valid is None:
        if not class_balance:
            return F.binary_cross_entropy_with_logits(logits, target)
        positive = target.mean().clamp(0.01, 0.99)
        weight = torch.where(target > 0.5, 0.5 / positive, 0.5 / (1.0 - positive))
        return F.binary_cross_entropy_with_logits(logits, target, weight=weight)
    losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if class_balance:
        positive = (torch.where(valid, target, 0.0).sum() / _valid_count(valid)).clamp(0.01, 0.99)
        losses = losses * torch.where(target > 0.5, 0.5 / positive, 0.5 / (1.0 - positive))
    return _masked_mean(losses, valid)


def dice_loss(probability: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, valid: torch.Tensor | None = None) -> torch.Tensor:
    """1 - soft Dice over the whole tensor (or its ``valid`` voxels); ``probability`` and ``target`` in [0, 1]."""
    if valid is not None:
        probability, target = torch.where(valid, probability, 0.0), torch.where(valid, target, 0.0)
    intersection = (probability * target).sum()
    return 1.0 - (2.0 * intersection + smooth) / (probability.sum() + target.sum() + smooth)


def balanced_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE-with-logits (each class weighs half) plus soft Dice; ``target`` float 0/1."""
    return weighted_bce(logits, target, True) + dice_loss(torch.sigmoid(logits), target)


def mse_loss(prediction: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error (over the ``valid`` voxels where given)."""
    if valid is None:
        return F.mse_loss(prediction, target)
    return _masked_mean((prediction - target).square(), valid)


def kept_count(voxels: int, keep_fraction: float) -> int:
    """How many voxels OHEM keeps out of ``voxels``: ceil(fraction * voxels), at least 1."""
    return max(1, min(voxels, math.ceil(keep_fraction * voxels)))


def ohem_mse(prediction: torch.Tensor, target: torch.Tensor, keep_fraction: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the top-k squared errors, k = ``kept_count(numel, keep_fraction)`` (the hardest voxels only).

    With ``valid``: the hardest of the valid voxels, k of their number (the others rank below any error).
    """
    errors = (prediction - target).square().flatten()
    if valid is None:
        return torch.topk(errors, kept_count(errors.numel(), keep_fraction), sorted=False).values.mean()
    count = int(valid.sum())
    if count == 0:
        return errors.sum() * 0.0
    errors = torch.where(valid.flatten(), errors, -1.0)  # squared errors are >= 0: never picked before a valid voxel
    return torch.topk(errors, kept_count(count, keep_fraction), sorted=False).values.mean()


def ohem_threshold(probability_of_truth: torch.Tensor, threshold: float, min_kept: int) -> torch.Tensor:
    """The OHEM-BCE cut: max(``threshold``, the ``min_kept``-th smallest probability of the true class).

    Voxels whose true-class probability is below the cut are kept, so at least
    ``min_kept`` voxels (up to ties) are kept, and every voxel predicted worse than ``threshold``.
    """
    flat = probability_of_truth.flatten()
    k = max(1, min(int(min_kept), flat.numel()))
    floor = torch.tensor(threshold, dtype=flat.dtype, device=flat.device)
    # Where k voxels or more are at or below the threshold, so is the k-th smallest: the cut is the
    # threshold, exactly, and the selection (a copy and a partial sort of every voxel) can be skipped.
    if int((flat <= floor).sum()) >= k:
        return floor
    return torch.maximum(torch.kthvalue(flat, k).values, floor)


def ohem_bce(
    logits: torch.Tensor, target: torch.Tensor, threshold: float, keep_fraction: float, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """OHEM binary cross-entropy: mean BCE over voxels whose true-class probability is <= the OHEM cut.

    ``target`` float 0/1. min_kept = ``kept_count(numel, keep_fraction)`` (of the
    ``valid`` voxels' number where given: the others are never kept).
    Returns (loss, the cut, number of voxels kept).
    """
    probability = torch.sigmoid(logits)
    probability_of_truth = torch.where(target > 0.5, probability, 1.0 - probability).detach()
    if valid is None:
        cut = ohem_threshold(probability_of_truth, threshold, kept_count(probability_of_truth.numel(), keep_fraction))
        keep = probability_of_truth <= cut
    else:
        # 2 is above any cut (a probability, or the threshold < 1): unlabelled voxels are never kept.
        probability_of_truth = torch.where(valid, probability_of_truth, 2.0)
        cut = ohem_threshold(probability_of_truth, threshold, kept_count(max(1, int(valid.sum())), keep_fraction))
        keep = (probability_of_truth <= cut) & valid
    losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    kept = int(keep.sum())
    # A masked sum, not losses[keep]: no gather of the kept voxels forward, no scatter backward.
    return torch.where(keep, losses, 0.0).sum() / max(kept, 1), cut, kept


def _binary_terms(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: dict[str, float],
    balance: bool,
    threshold: float,
    keep_fraction: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted bce + dice + ohem_bce terms of one binary channel (``logits`` float, ``target`` 0/1)."""
    total = logits.new_zeros(())
    if weights.get("bce", 0):
        total = total + weights["bce"] * weighted_bce(logits, target, balance, valid)
    if weights.get("dice", 0):
        total = total + weights["dice"] * dice_loss(torch.sigmoid(logits), target, valid=valid)
    if weights.get("ohem_bce", 0):
        total = total + weights["ohem_bce"] * ohem_bce(logits, target, threshold, keep_fraction, valid)[0]
    return total


def target_loss(
    logits: torch.Tensor, target: torch.Tensor, target_kind: str, train_cfg: dict[str, Any], valid: torch.Tensor | None = None
) -> torch.Tensor:
    """The weighted sum of losses for ``target_kind`` (weights: ``train_cfg["loss_weights"][target_kind]``).

    ``logits`` and ``target``: float (batch, channel, z, y, x). Binary targets
    get bce/dice (and ohem_bce) on each channel; ``skeleton_distance`` compares
    tanh(logits) with the target by mse/ohem_mse, and ohem_bce/bce/dice on the
    foreground (target > 0). ``valid``: bool (batch, z, y, x), the voxels that count (None: all).
    """
    weights = train_cfg["loss_weights"][target_kind]
    keep_fraction, threshold = train_cfg["ohem_keep_fraction"], train_cfg["ohem_threshold"]
    balance = train_cfg["bce_class_balance"]
    total = logits.new_zeros(())
    if target_kind == "skeleton_distance":
        prediction = torch.tanh(logits)
        foreground = (target > 0).to(logits.dtype)
        every = valid[:, None].expand_as(logits) if valid is not None else None
        if weights.get("mse", 0):
            total = total + weights["mse"] * mse_loss(prediction, target, every)
        if weights.get("ohem_mse", 0):
            total = total + weights["ohem_mse"] * ohem_mse(prediction, target, keep_fraction, every)
        # The foreground terms read tanh as a probability: (tanh + 1) / 2 = sigmoid(2 * logits).
        return total + _binary_terms(2.0 * logits, foreground, weights, balance, threshold, keep_fraction, every)
    for channel in range(logits.shape[1]):
        channel_logits, channel_target = logits[:, channel], target[:, channel]
        total = total + _binary_terms(channel_logits, channel_target, weights, balance, threshold, keep_fraction, valid)
        if weights.get("mse", 0):
            total = total + weights["mse"] * mse_loss(torch.sigmoid(channel_logits), channel_target, valid)
        if weights.get("ohem_mse", 0):
            total = total + weights["ohem_mse"] * ohem_mse(torch.sigmoid(channel_logits), channel_target, keep_fraction, valid)
    return total


# ---- embedding heads: the discriminative loss ---------------------------------------
# De Brabandere, Neven & Van Gool 2017: vectors of one instance are pulled towards their
# mean (within delta_var), the means of different instances pushed apart (2 * delta_dist).


def _norm(vectors: torch.Tensor) -> torch.Tensor:
    # sqrt at 0 has an infinite gradient; a floor of 1e-12 on the square keeps
    # the gradient finite (0) for a perfect cluster and changes values by <= 1e-6.
    return vectors.pow(2).sum(-1).clamp_min(1e-12).sqrt()


def _sample_loss(
    embeddings: torch.Tensor, instances: torch.Tensor, delta_var: float, delta_dist: float, background: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(var, dist, reg) of one sample: embeddings (E, voxels), instances (voxels,) int, 0 = background
    (ignored, or with ``background`` one more cluster)."""
    foreground = instances >= 0 if background else instances > 0
    zero = embeddings.sum() * 0.0  # keeps the graph (and device, dtype) for samples without objects
    if not bool(foreground.any()):
        return zero, zero, zero
    vectors = embeddings[:, foreground].t()  # (voxels, E)
    ids, cluster = torch.unique(instances[foreground], return_inverse=True)
    n_clusters = len(ids)
    counts = torch.bincount(cluster, minlength=n_clusters).to(vectors.dtype)
    means = torch.zeros(n_clusters, vectors.shape[1], dtype=vectors.dtype, device=vectors.device)
    means = means.index_add(0, cluster, vectors) / counts[:, None]

    pull = torch.clamp(_norm(vectors - means[cluster]) - delta_var, min=0.0) ** 2
    per_cluster = torch.zeros(n_clusters, dtype=vectors.dtype, device=vectors.device).index_add(0, cluster, pull)
    var = (per_cluster / counts).mean()

    if n_clusters > 1:
        first, second = torch.triu_indices(n_clusters, n_clusters, offset=1, device=vectors.device)
        # Each unordered pair once: the mean over c != c' is the same number.
        push = torch.clamp(2.0 * delta_dist - _norm(means[first] - means[second]), min=0.0) ** 2
        dist = push.mean()
    else:
        dist = zero
    reg = _norm(means).mean()
    return var, dist, reg


def discriminative_loss(
    embeddings: torch.Tensor,
    instances: torch.Tensor,
    delta_var: float = 0.5,
    delta_dist: float = 1.5,
    gamma: float = 1e-4,
    alpha: float = 1.0,
    beta: float = 1.0,
    background: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """De Brabandere et al.'s discriminative loss and its terms.

    ``embeddings``: float (B, E, z, y, x); ``instances``: int (B, z, y, x)
    instance ids, 0 = background (excluded), negative = unlabelled (always excluded). Per sample:
    var = mean over instances c of mean over its voxels of max(0, ||mu_c - x|| - delta_var)²;
    dist = mean over pairs c != c' of max(0, 2 delta_dist - ||mu_c - mu_c'||)²;
    reg = mean over c of ||mu_c||. Each term is averaged over the batch
    (a sample without instances adds 0). With ``background``, the background
    voxels (id 0) count as one more cluster, pulled together and pushed from
    every instance, so that embeddings also tell mitochondrion from background
    (which nearest-neighbour classification needs). Returns
    (alpha var + beta dist + gamma reg, {"var", "dist", "reg"}), scalar tensors.
    """
    if embeddings.ndim != instances.ndim + 1 or embeddings.shape[0] != instances.shape[0] or embeddings.shape[2:] != instances.shape[1:]:
        raise ValueError(f"embeddings (B, E, ...) {tuple(embeddings.shape)} and instances (B, ...) {tuple(instances.shape)} do not match")
    batch, dim = embeddings.shape[:2]
    terms = [
        _sample_loss(embeddings[b].reshape(dim, -1), instances[b].reshape(-1).long(), delta_var, delta_dist, background)
        for b in range(batch)
    ]
    var, dist, reg = (torch.stack(values).mean() for values in zip(*terms))
    total = alpha * var + beta * dist + gamma * reg
    return total, {"var": var, "dist": dist, "reg": reg}


# ---- what training minimises -----------------------------------------------------------


class TrainingLossParts(NamedTuple):
    """One batch's loss and what it was computed from.

    ``loss``: the scalar to minimise; ``terms``: the discriminative loss's
    ``var``/``dist``/``reg`` (empty without an embedding head), for the log;
    ``logits``, ``aux``, ``target``: the target channels only (the embedding
    channels and the instance-id channel split off), for TensorBoard.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    logits: torch.Tensor
    aux: list[torch.Tensor]
    target: torch.Tensor


@dataclass(frozen=True)
class TrainingLoss:
    """The loss ``train_model`` minimises, from the network's logits and the batch's target.

    target weight * (``target_loss`` of the logits + ``train.aux_loss_weight``
    * ``target_loss`` of each auxiliary head's logits), plus, with
    ``embedding_channels`` (an embedding head: the last output channels),
    ``train.discriminative.weight`` * ``discriminative_loss`` of those channels
    against the instance ids in the target's last channel. The target weight
    is ``train.discriminative.target_weight`` with an embedding head, else 1.
    ``train_cfg``: the ``train`` section, defaults filled. With ``masked``, the
    target's very last channel is the valid mask (1 labelled, 0 not: a
    proofread crop's ``contract.VALID_MASK``): the other channels' targets are
    set to 0 where it is 0 before any loss reads them, every term counts the
    valid voxels only, and the embedding's unlabelled voxels belong to no cluster.
    """

    target_kind: str
    train_cfg: dict[str, Any]
    embedding_channels: int = 0
    masked: bool = False

    def __call__(self, logits: torch.Tensor, aux: list[torch.Tensor], target: torch.Tensor) -> TrainingLossParts:
        """``logits``/``aux``: (batch, channel, z, y, x) outputs of ``forward_with_aux``; ``target`` float, same layout."""
        train_cfg, embedding_channels = self.train_cfg, self.embedding_channels
        discriminative = train_cfg["discriminative"]
        terms: dict[str, torch.Tensor] = {}
        valid = None
        if self.masked:
            valid = target[:, -1] > 0.5
            # Constants where nothing is labelled: no label there can reach the loss or its gradient.
            target = torch.where(valid[:, None], target[:, :-1], 0.0)
        if embedding_channels:
            # The last target channel holds the instance ids, the last output channels the embedding.
            instance_ids = target[:, -1].round().long()
            if valid is not None:
                instance_ids = torch.where(valid, instance_ids, -1)
            target = target[:, :-1]
            embedding_loss, terms = discriminative_loss(
                logits[:, -embedding_channels:].float(),
                instance_ids,
                discriminative["delta_var"],
                discriminative["delta_dist"],
                discriminative["gamma"],
                background=discriminative["background_cluster"],
            )
            logits, aux = logits[:, :-embedding_channels], [a[:, :-embedding_channels] for a in aux]
            target_weight = discriminative["target_weight"]
        else:
            target_weight = 1.0
        loss = target_weight * target_loss(logits.float(), target, self.target_kind, train_cfg, valid)
        for aux_logits in aux:
            loss = loss + target_weight * train_cfg["aux_loss_weight"] * target_loss(
                aux_logits.float(), target, self.target_kind, train_cfg, valid
            )
        if embedding_channels:
            loss = loss + discriminative["weight"] * embedding_loss
        return TrainingLossParts(loss, terms, logits, aux, target)
