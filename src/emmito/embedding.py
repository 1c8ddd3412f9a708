"""Embedding heads: the discriminative loss, clustering of embeddings into instances, nearest-neighbour classification.

An embedding head gives every voxel a vector of ``embedding_dim`` floats. The
discriminative loss (De Brabandere, Neven & Van Gool 2017) pulls the vectors of
one instance towards their mean (within ``delta_var``) and pushes the means of
different instances apart (to at least ``2 * delta_dist``), so that instances
become clusters in embedding space:

- ``embedding_cluster`` turns embeddings into instances inside a foreground
  mask: per foreground component, a flat-kernel mean-shift on a subsample,
  every voxel assigned to its nearest mode, then 6-connected components of the
  result with a size filter (embeddings are trained to differ only between
  objects in one training patch, so two far-apart objects may share a mode;
  the connected components split them again).
- nearest-neighbour classification (NNC) labels each voxel by the classes of
  its ``k`` nearest embeddings in a support set sampled from a labelled
  (training) volume.

Heat files store embeddings as uint8 channels ``emb0 .. emb{E-1}``:
``rint((clip(e, -R, R) / R + 1) * 127.5)`` with ``R = embedding_range``
(an attribute of the heat file), a step of ``2R / 255`` in embedding units.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import cc3d
import fastremap
import numpy as np
import torch
from scipy.spatial import cKDTree
from tqdm import tqdm

from emmito.config import with_defaults
from emmito.io import EmmitoError, atomic_path

EMBEDDING_PREFIX = "emb"
# Default embedding range of heat files that do not say: |e| <= 8 keeps
# clusters 3 apart (2 * delta_dist) and near the origin (the regulariser).
DEFAULT_EMBEDDING_RANGE = 8.0
# Voxels whose distances to the support set are computed at a time: memory is
# about 4 * (chunk_voxels * support size) bytes (65536 x 4096 -> 1 GB).
NNC_CHUNK_VOXELS = 16384
SUPPORT_FORMAT = 1
# Mean-shift starts per round (evenly spaced over the subsample): time is
# linear in them. A cluster that no start reaches is found by the next round,
# which runs on the points left far from every mode.
MEAN_SHIFT_STARTS = 256
MEAN_SHIFT_ROUNDS = 3


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


# ---- loss ----------------------------------------------------------------------------


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
    instance ids, 0 = background (excluded). Per sample:
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


# ---- clustering ------------------------------------------------------------------------


def _squared_distances(a: torch.Tensor, b: torch.Tensor, b_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)) by one matrix product (cdist's exact path is several times slower)."""
    b_norms = b.pow(2).sum(1) if b_norms is None else b_norms
    return torch.addmm(a.pow(2).sum(1, keepdim=True) + b_norms[None], a, b.t(), alpha=-2.0).clamp_min_(0.0)


def mean_shift_modes(
    features: np.ndarray, bandwidth: float, starts: int | None = None, max_iterations: int = 50
) -> np.ndarray:
    """Modes of ``features`` (float32 (N, E)) by flat-kernel mean-shift from up to ``starts`` (default MEAN_SHIFT_STARTS) evenly spaced points.

    Each start moves to the mean of the points within ``bandwidth`` until the
    starts stop moving; a converged start within ``bandwidth`` of a mode with
    more points nearby joins it (modes taken by decreasing density, ties by
    index: deterministic). Returns float32 (modes, E), densest first.
    Time and memory grow as N x starts: pass a subsample (a few thousand points).
    """
    points = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    starts = MEAN_SHIFT_STARTS if starts is None else starts
    chosen = np.unique(np.linspace(0, len(points) - 1, min(starts, len(points))).round().astype(np.int64))
    moving = points[chosen].clone()
    radius = bandwidth * bandwidth
    point_norms = points.pow(2).sum(1)
    for _ in range(max_iterations):
        near = (_squared_distances(moving, points, point_norms) <= radius).to(torch.float32)
        moved = (near @ points) / near.sum(1, keepdim=True).clamp_min(1.0)
        shift = float((moved - moving).abs().max())
        moving = moved
        if shift < 1e-3 * bandwidth:
            break
    density = (_squared_distances(moving, points, point_norms) <= radius).sum(1).numpy()
    close = (_squared_distances(moving, moving) <= radius).numpy()
    order = np.lexsort((np.arange(len(moving)), -density))
    taken = np.zeros(len(moving), dtype=bool)
    modes = []
    for i in order.tolist():
        if not taken[i]:
            modes.append(i)
            taken |= close[i]
    return moving[modes].numpy()


def nearest_centre(features: np.ndarray, centres: np.ndarray, chunk_voxels: int = NNC_CHUNK_VOXELS) -> tuple[np.ndarray, np.ndarray]:
    """(index int64 (N,), distance float32 (N,)) of the nearest of ``centres`` (M, E) for each of ``features`` (N, E), in chunks."""
    centre_tensor = torch.from_numpy(np.ascontiguousarray(centres, dtype=np.float32))
    nearest = np.empty(len(features), dtype=np.int64)
    distance = np.empty(len(features), dtype=np.float32)
    for start in range(0, len(features), chunk_voxels):
        chunk = torch.from_numpy(np.ascontiguousarray(features[start : start + chunk_voxels], dtype=np.float32))
        best = torch.cdist(chunk, centre_tensor).min(1)
        nearest[start : start + len(chunk)] = best.indices.numpy()
        distance[start : start + len(chunk)] = best.values.numpy()
    return nearest, distance


def _subsample(count: int, sample: int, seed: int) -> np.ndarray:
    if count <= sample:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=sample, replace=False))


def cluster_features(
    features: np.ndarray, bandwidth: float, sample: int, seed: int = 0, min_points: int = 1
) -> np.ndarray:
    """Cluster ids (int64 (N,), 0..) of ``features`` (float32 (N, E)) by mean-shift on a subsample.

    Up to ``sample`` points (drawn with ``seed``: deterministic) find the
    modes; every point takes its nearest mode. Points left farther than
    ``bandwidth`` from every mode (a cluster no start reached), if at least
    ``min_points``, get a mean-shift of their own (up to MEAN_SHIFT_ROUNDS
    rounds). Points within ``bandwidth`` of their mean, but for fewer than
    ``min_points`` (too few to be an object of their own), are one cluster
    without a mean-shift: most foreground components are one mitochondrion.
    """
    if len(features) == 0:
        return np.zeros(0, dtype=np.int64)
    centre = features.mean(0, dtype=np.float64).astype(np.float32)
    far = np.count_nonzero(((features - centre) ** 2).sum(1) > bandwidth * bandwidth)
    if far < max(1, min_points):
        return np.zeros(len(features), dtype=np.int64)
    modes = mean_shift_modes(features[_subsample(len(features), sample, seed)], bandwidth)
    nearest, distance = nearest_centre(features, modes)
    for _ in range(MEAN_SHIFT_ROUNDS - 1):
        stray = np.flatnonzero(distance > bandwidth)
        if len(stray) < max(1, min_points):
            break
        extra = mean_shift_modes(features[stray[_subsample(len(stray), sample, seed)]], bandwidth)
        modes = np.concatenate([modes, extra])
        nearest, distance = nearest_centre(features, modes)
    return nearest


def keep_lut(keep: np.ndarray) -> np.ndarray:
    """uint32 lookup table mapping the ids where ``keep`` (bool, one entry per id, id 0 first) to 1, 2, ... in order, the rest to 0."""
    keep = np.asarray(keep, dtype=bool).copy()
    keep[0] = False
    lut = np.zeros(len(keep), dtype=np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return lut


def relabel_components(labels: np.ndarray, min_size: int) -> np.ndarray:
    """6-connected components of a multi-label volume (uint32 (z, y, x)), those below ``min_size`` removed.

    Voxels of different labels never join, and one label in two separate
    places becomes two objects. Returns uint32 ids consecutive from 1 in scan order.
    """
    components, count = cc3d.connected_components(labels, connectivity=6, return_N=True, out_dtype=np.uint32)
    sizes = np.bincount(components.reshape(-1), minlength=count + 1)
    lut = keep_lut(sizes >= max(1, min_size))
    # In place: a second block-sized array is what bounds memory here.
    fastremap.remap_from_array(components.reshape(-1), lut, in_place=True)
    return components


def cluster_foreground(
    features: np.ndarray,
    foreground: np.ndarray,
    bandwidth: float,
    sample: int,
    min_size: int,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Instances from the embeddings of the foreground voxels.

    ``features``: float32 (N, E), the embeddings of ``foreground``'s voxels in
    C order (``embeddings[:, foreground].T``); ``foreground``: bool (z, y, x).
    Each 6-connected foreground component is clustered on its own (see
    ``cluster_features``), then ``relabel_components``. Returns uint32
    (z, y, x) ids consecutive from 1. Memory: the block's labels plus the
    foreground's features; only ``features`` of a component are clustered at a time.
    """
    components, count = cc3d.connected_components(foreground, connectivity=6, return_N=True, out_dtype=np.uint32)
    component_of_voxel = components[foreground]
    order = np.argsort(component_of_voxel, kind="stable")
    bounds = np.searchsorted(component_of_voxel[order], np.arange(1, count + 2))
    cluster_of_voxel = np.zeros(len(features), dtype=np.uint32)
    next_id = 1
    for component in tqdm(range(count), desc="clusters", unit="component", file=sys.stderr, disable=not progress):
        members = order[bounds[component] : bounds[component + 1]]
        clusters = cluster_features(features[members], bandwidth, sample, seed, min_points=min_size)
        cluster_of_voxel[members] = clusters.astype(np.uint32) + next_id
        next_id += int(clusters.max()) + 1 if len(clusters) else 0
    labels = np.zeros(foreground.shape, dtype=np.uint32)
    labels[foreground] = cluster_of_voxel
    return relabel_components(labels, min_size)


def embedding_cluster(
    embeddings: np.ndarray, foreground: np.ndarray, params: dict[str, Any] | None = None, progress: bool = False
) -> np.ndarray:
    """``embedding_cluster`` decoder: instances from embeddings float32 (E, z, y, x) inside ``foreground`` bool (z, y, x).

    ``params``: the ``segment`` section (keys embedding_bandwidth,
    embedding_sample, embedding_min_size; defaults filled). Returns uint32
    (z, y, x) ids consecutive from 1, 0 = background. Deterministic.
    """
    params = with_defaults("segment", params)
    if embeddings.ndim != 4 or embeddings.shape[1:] != foreground.shape:
        raise ValueError(f"embeddings (E, z, y, x) {embeddings.shape} and foreground {foreground.shape} do not match")
    features = embeddings[:, foreground].T.astype(np.float32, copy=False)
    return cluster_foreground(
        features,
        foreground,
        params["embedding_bandwidth"],
        params["embedding_sample"],
        params["embedding_min_size"],
        progress=progress,
    )


# ---- nearest-neighbour classification ------------------------------------------------


def build_support_set(
    embeddings: np.ndarray, labels: np.ndarray, n_voxels: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A class-balanced support set: (features float32 (N, E), classes int64 (N,)).

    ``embeddings``: float (E, z, y, x); ``labels``: int (z, y, x) class of each
    voxel (e.g. 0 background, 1 mitochondrion). Draws ``n_voxels // classes``
    voxels of each class present (all of a class that has fewer), with
    ``seed``; same inputs, same set.
    """
    if embeddings.shape[1:] != labels.shape:
        raise ValueError(f"embeddings (E, z, y, x) {embeddings.shape} and labels {labels.shape} do not match")
    rng = np.random.default_rng(seed)
    flat_labels = labels.reshape(-1)
    present = np.unique(flat_labels)
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


def nearest_neighbour_features(
    query: np.ndarray, features: np.ndarray, classes: np.ndarray, k: int, chunk_voxels: int = NNC_CHUNK_VOXELS
) -> np.ndarray:
    """Class probabilities float32 (N, C) of ``query`` (N, E): the share of each class among its ``k`` nearest ``features``.

    ``features`` (M, E) with ``classes`` int (M,) in 0..C-1. The neighbours
    are found exactly with a k-d tree over the support set, once per
    distinct query vector, ``chunk_voxels`` vectors at a time. Memory: a few
    arrays of N entries (the query's size), none of N x M.
    """
    n_classes = int(classes.max()) + 1 if len(classes) else 1
    k = max(1, min(k, len(features)))
    probabilities = np.zeros((len(query), n_classes), dtype=np.float32)
    if len(features) == 0:
        return probabilities
    # Embeddings read from a heat file are quantised to 8 bits: a block holds
    # far fewer distinct vectors than voxels, and each is classified once.
    query = np.ascontiguousarray(query, dtype=np.float32)
    rows = query.view(np.dtype((np.void, query.dtype.itemsize * query.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    distinct = query[first]
    tree = cKDTree(np.ascontiguousarray(features, dtype=np.float64))
    support_classes = np.asarray(classes, dtype=np.int64)
    distinct_probabilities = np.zeros((len(distinct), n_classes), dtype=np.float32)
    for start in range(0, len(distinct), chunk_voxels):
        chunk = distinct[start : start + chunk_voxels].astype(np.float64)
        nearest = tree.query(chunk, k=k)[1].reshape(len(chunk), k)
        votes = np.zeros((len(chunk), n_classes), dtype=np.float32)
        for column in range(k):  # k small adds: no (chunk, k, C) one-hot array
            votes[np.arange(len(chunk)), support_classes[nearest[:, column]]] += 1.0
        distinct_probabilities[start : start + len(chunk)] = votes / k
    probabilities[:] = distinct_probabilities[inverse.reshape(-1)]
    return probabilities


def nearest_neighbour_classify(
    embeddings: np.ndarray, features: np.ndarray, classes: np.ndarray, k: int, chunk_voxels: int = NNC_CHUNK_VOXELS
) -> tuple[np.ndarray, np.ndarray]:
    """NNC of a block: (probabilities float32 (C, z, y, x), class map int64 (z, y, x)).

    ``embeddings``: float (E, z, y, x); ``features``/``classes``: the support
    set (``build_support_set``). A voxel's probability of class c is the share
    of c among its ``k`` nearest support embeddings (Euclidean); its class is
    the most frequent (ties to the lower class).
    """
    spatial = embeddings.shape[1:]
    query = embeddings.reshape(embeddings.shape[0], -1).T
    probabilities = nearest_neighbour_features(query, features, classes, k, chunk_voxels)
    class_map = probabilities.argmax(1).reshape(spatial)
    return np.ascontiguousarray(probabilities.T.reshape((-1, *spatial))), class_map


def save_support_set(path: str | os.PathLike, features: np.ndarray, classes: np.ndarray, attrs: dict[str, Any] | None = None) -> None:
    """Write a support set to ``path`` (.npz: features float32 (N, E), classes int64 (N,), plus scalar attrs), atomically."""
    extra = {key: np.asarray(value) for key, value in (attrs or {}).items()}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                features=np.asarray(features, dtype=np.float32),
                classes=np.asarray(classes, dtype=np.int64),
                format=np.asarray(SUPPORT_FORMAT),
                **extra,
            )


def load_support_set(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 (N, E), classes int64 (N,)) from ``save_support_set``'s file; EmmitoError naming the fix."""
    path = Path(path)
    if not path.exists():
        raise EmmitoError(
            f"{path}: support set not found: segment.decoder nearest_neighbour needs the support.npz that "
            "training an embedding model writes beside its checkpoint (retrain with model.head embedding) or set segment.support_set"
        )
    try:
        with np.load(path) as data:
            features, classes = data["features"].astype(np.float32), data["classes"].astype(np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise EmmitoError(f"{path}: not a readable support set ({exc}): delete it and retrain the model that writes it") from None
    if features.ndim != 2 or classes.shape != (features.shape[0],) or len(classes) == 0:
        raise EmmitoError(f"{path}: support set has features {features.shape} and classes {classes.shape}: delete it and retrain")
    return features, classes
