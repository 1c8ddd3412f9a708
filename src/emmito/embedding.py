"""The embedding codec: how an embedding head's output is named and stored in heat files.

An embedding head gives every voxel a vector of ``embedding_dim`` floats,
trained with the discriminative loss (``emmito.losses``) so that instances
become clusters in embedding space; ``emmito.decoders`` turns them into
instances (mean-shift clustering, nearest-neighbour classification against a
support set that ``build_support_set`` draws from a labelled volume).

Heat files store embeddings as uint8 channels ``emb0 .. emb{E-1}``:
``rint((clip(e, -R, R) / R + 1) * 127.5)`` with ``R = embedding_range``
(an attribute of the heat file), a step of ``2R / 255`` in embedding units.
"""

from __future__ import annotations

import numpy as np
import torch

EMBEDDING_PREFIX = "emb"
# Default embedding range of heat files that do not say: |e| <= 8 keeps
# clusters 3 apart (2 * delta_dist) and near the origin (the regulariser).
DEFAULT_EMBEDDING_RANGE = 8.0


def embedding_channel_names(embedding_dim: int) -> list[str]:
    """Heat-file channel names of an embedding head: ``emb0 .. emb{embedding_dim-1}``."""
    return [f"{EMBEDDING_PREFIX}{i}" for i in range(embedding_dim)]


def embedding_channels(channels: list[str]) -> list[int]:
    """Indices of the ``emb<i>`` channels in a heat file's channel list, in the order of ``i``."""
    found = {}
    for index, name in enumerate(channels):
        suffix = name[len(EMBEDDING_PREFIX):]
        if name.startswith(EMBEDDING_PREFIX) and suffix.isdigit():
            found[int(suffix)] = index
    return [found[i] for i in sorted(found)]


def embeddings_to_heat(embeddings: np.ndarray, embedding_range: float = DEFAULT_EMBEDDING_RANGE) -> np.ndarray:
    """Embeddings (float, any shape) -> uint8 0..255, ``rint((clip(e, -R, R) / R + 1) * 127.5)``."""
    scaled = (np.clip(embeddings, -embedding_range, embedding_range) / embedding_range + 1.0) * 127.5
    return np.rint(scaled).astype(np.uint8)


def heat_to_embeddings(heat: np.ndarray, embedding_range: float = DEFAULT_EMBEDDING_RANGE) -> np.ndarray:
    """uint8 heat channels -> float32 embeddings, the inverse of ``embeddings_to_heat`` up to its step 2R/255."""
    return (heat.astype(np.float32) / np.float32(127.5) - np.float32(1.0)) * np.float32(embedding_range)


def embedding_logits(embeddings: torch.Tensor, embedding_range: float = DEFAULT_EMBEDDING_RANGE) -> torch.Tensor:
    """The logit of ``clip(e / (2R) + 0.5, eps, 1 - eps)``: its sigmoid, times 255, is the heat of ``e``."""
    share = (embeddings / (2.0 * embedding_range) + 0.5).clamp(1e-6, 1.0 - 1e-6)
    return torch.log(share) - torch.log1p(-share)


# ---- support sets ---------------------------------------------------------------------


def build_support_set(
    embeddings: np.ndarray, labels: np.ndarray, n_voxels: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced support set: (features float32 (N, E), classes int64 (N,)).

    ``embeddings``: float (E, z, y, x); ``labels``: int (z, y, x) class of each
    voxel (e.g. 0 background, 1 mitochondrion; negative: unlabelled, never drawn). Draws ``n_voxels // classes``
    voxels of each class present (all of a class that has fewer), with
    ``seed``; same inputs, same set.
    """
    if embeddings.shape[1:] != labels.shape:
        raise ValueError(f"embeddings (E, z, y, x) {embeddings.shape} and labels {labels.shape} do not match")
    rng = np.random.default_rng(seed)
    flat_labels = labels.reshape(-1)
    present = np.unique(flat_labels)
    present = present[present >= 0]
    per_class = max(1, n_voxels // max(1, len(present)))
    chosen = []
    for value in present.tolist():
        voxels = np.flatnonzero(flat_labels == value)
        if len(voxels) > per_class:
            voxels = np.sort(rng.choice(voxels, size=per_class, replace=False))
        chosen.append(voxels)
    indices = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    features = embeddings.reshape(embeddings.shape[0], -1)[:, indices].T.astype(np.float32)
    return np.ascontiguousarray(features), flat_labels[indices].astype(np.int64)
