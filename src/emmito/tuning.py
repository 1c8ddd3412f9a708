"""Decoder tuning: the ``segment`` settings that suit a model, chosen on labelled volumes by grid search.

The compute that ``emmito tune`` wraps (and ``benchmarks/quality_cdeep3m.py``
calls): given the heat a model predicts for labelled volumes (uint8
channels, as infer writes them, at the inference scale) and their labels at
the same scale, ``tune`` decodes the heat with every point of a small grid
over the settings that matter for the decoder (``TUNED_KEYS``) and keeps the
point with the highest score: instance F1 averaged over the IoU thresholds
0.50, 0.55, ..., 0.95 of ``metrics.evaluate_arrays`` (``f1_at_iou``, the
matching ``evaluate`` uses), averaged over the volumes. F1 at IoU 0.5 alone
ties or flips on a handful of objects (a validation volume holds tens); the
average over thresholds also rewards objects whose shapes are right, so a
foreground threshold that shrinks or bloats every object loses.

- The grid depends on what the heat means: a probability heatmap (``binary``,
  ``binary_contour``, an embedding model's foreground) is thresholded at
  probabilities (0.25-0.75), a ``skeleton_distance`` heatmap (the original
  recipe's, 128 at an object's border) at low values around its 16.
- Minimum sizes are a per-object filter after the watershed, so the watershed
  decoders decode once per threshold setting and apply each candidate minimum
  size to that result (``size_filter``; it equals decoding with that size).
  The candidate sizes are fractions of the labels' median object size (and the
  schema default), so they suit the data's scale.
- The untuned settings (``untuned_settings``: the schema defaults, with
  probability 0.5 for a probability heatmap's foreground) compete with the
  grid. Ties (scores equal to 1e-9) go to the higher F1 at IoU 0.5, then to the
  point nearest the untuned settings (so a tie keeps them), then to the first
  in grid order: the result is deterministic.
- Work is bounded: a few tens of decodes per volume (``grid_size``); a caller
  with a large volume tunes on ``central_slices`` of it.

``resolve_settings`` is how ``segment`` combines them: schema defaults <
the tuned settings (decoder.json) < the keys the user set in the config.
A probability heatmap never gets the skeleton-distance foreground threshold:
without tuned settings and a user's value, ``heat_watershed`` thresholds it at
``PROBABILITY_FOREGROUND_THRESHOLD`` (probability 0.5).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from emmito import config, embedding
from emmito.decoders import EMBEDDING_DECODERS, HEAT_CHANNEL, SupportSet, decode, resolve_decoder
from emmito.io import EmmitoError
from emmito.labels import apply_lut, drop_wide_objects, keep_lut
from emmito.metrics import evaluate_arrays, rounded

# The settings tuned for each decoder: thresholds first, the minimum object size last.
TUNED_KEYS: dict[str, tuple[str, ...]] = {
    "heat_watershed": ("foreground_threshold", "seed_threshold", "min_size"),
    "bc_watershed": ("bc_foreground", "bc_seed_foreground", "bc_seed_contour", "bc_min_size"),
    "embedding_cluster": ("embedding_foreground", "embedding_min_size"),
    "nearest_neighbour": ("nnc_threshold", "embedding_min_size"),
}
# Every key some decoder's tuning chooses (a value of these set in a config overrides the tuned one).
ALL_TUNED_KEYS = tuple(dict.fromkeys(key for keys in TUNED_KEYS.values() for key in keys))
# The minimum-size key of each decoder (filtered after decoding where the decoder allows it).
SIZE_KEYS = {decoder: keys[-1] for decoder, keys in TUNED_KEYS.items()}
# Decoders whose minimum size is a pure per-object filter on their result (the watersheds).
POST_FILTER_SIZE = ("heat_watershed", "bc_watershed")

PROBABILITY, SKELETON = "probability", "skeleton_distance"
# heat_watershed on a probability heatmap with nothing tuned and nothing set: probability 0.5.
PROBABILITY_FOREGROUND_THRESHOLD = 128

# The threshold grids (heat units 0-255; nnc_threshold is a share of votes).
THRESHOLD_GRID: dict[tuple[str, str], dict[str, tuple[float, ...]]] = {
    ("heat_watershed", PROBABILITY): {"foreground_threshold": (64, 96, 128, 160, 192), "seed_threshold": (160, 200, 240)},
    ("heat_watershed", SKELETON): {"foreground_threshold": (8, 16, 32, 64, 96), "seed_threshold": (150, 192, 224)},
    ("bc_watershed", PROBABILITY): {
        "bc_foreground": (96, 128, 160, 192, 216), "bc_seed_foreground": (192, 229), "bc_seed_contour": (128, 204),
    },
    ("embedding_cluster", PROBABILITY): {"embedding_foreground": (64, 96, 128, 160, 192)},
    ("nearest_neighbour", PROBABILITY): {"nnc_threshold": (0.3, 0.4, 0.5, 0.6, 0.7)},
}
# A seed threshold below its foreground threshold seeds every foreground voxel: not searched.
SEED_ABOVE = {"seed_threshold": "foreground_threshold", "bc_seed_foreground": "bc_foreground"}
# Candidate minimum sizes: these fractions of the labels' median object size, plus 0 and the schema default.
SIZE_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
EMBEDDING_SIZE_FRACTIONS = (1 / 8, 1 / 4, 1 / 2)  # each is a whole decode (mean-shift): fewer
TIE = 1e-9
IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class TuneVolume:
    """A labelled volume to tune on: its heat channels by name (uint8 (z, y, x)) and labels (uint32 (z, y, x)) at
    the same (inference) scale; ``slices`` = which slices of the whole volume they are (for the record)."""

    name: str
    channels: Mapping[str, np.ndarray]
    labels: np.ndarray
    slices: tuple[int, int]


@dataclass
class Tuned:
    """The result of ``tune``: the chosen trial, the untuned settings' trial, every trial, the grid, the volumes.

    A trial: {"settings" (the ``TUNED_KEYS`` of the decoder), "score" (mean F1
    over IoU 0.50..0.95), "instance_f1" (at IoU 0.5), "per_volume"}, means over the volumes.
    """

    decoder: str
    heat: str  # PROBABILITY or SKELETON
    chosen: dict[str, Any]
    untuned: dict[str, Any]  # the trial of ``untuned_settings``
    grid: dict[str, list[Any]]  # the values searched per key
    trials: list[dict[str, Any]]
    volumes: list[dict[str, Any]] = field(default_factory=list)  # per volume: name, slices, the chosen settings' metrics

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.chosen["settings"])

    def record(self) -> dict[str, Any]:
        """The JSON-ready record (decoder.json's content but the format version), floats rounded."""
        return rounded({
            "decoder": self.decoder,
            "heat": self.heat,
            "settings": self.settings,
            "score": self.chosen["score"],
            "instance_f1": self.chosen["instance_f1"],
            "score_is": "instance F1 averaged over IoU thresholds 0.50..0.95, mean over the volumes",
            "untuned": {k: self.untuned[k] for k in ("settings", "score", "instance_f1")},
            "volumes": self.volumes,
            "grid": self.grid,
            "trials": self.trials,
        })


def heat_kind(channels: Iterable[str]) -> str:
    """What the foreground heat means: SKELETON for a skeleton_distance heatmap, else PROBABILITY."""
    names = list(channels)
    return SKELETON if "skeleton_distance" in names and HEAT_CHANNEL not in names else PROBABILITY


def untuned_settings(decoder: str, heat: str) -> dict[str, Any]:
    """The tuned keys' values where nothing was tuned: the schema defaults, but probability 0.5 for
    ``heat_watershed``'s foreground on a probability heatmap (16, the schema's, suits skeleton_distance only)."""
    defaults = config.section_defaults("segment")
    settings = {key: defaults[key] for key in TUNED_KEYS[decoder]}
    if decoder == "heat_watershed" and heat == PROBABILITY:
        settings["foreground_threshold"] = PROBABILITY_FOREGROUND_THRESHOLD
    return settings


def central_slices(depth: int, max_slices: int) -> tuple[int, int]:
    """Slices [z0, z1) to tune on: all ``depth`` of them, or the central ``max_slices`` (0: all)."""
    if max_slices <= 0 or depth <= max_slices:
        return 0, depth
    start = (depth - max_slices) // 2
    return start, start + max_slices


def median_object_size(labels: Iterable[np.ndarray]) -> int:
    """The median voxel count of the objects of ``labels`` (0 when there are none)."""
    sizes = [np.bincount(np.asarray(label).reshape(-1))[1:] for label in labels]
    sizes = np.concatenate(sizes) if sizes else np.zeros(0)
    sizes = sizes[sizes > 0]
    return int(np.median(sizes)) if len(sizes) else 0


def size_candidates(decoder: str, median_size: int) -> list[int]:
    """The minimum sizes searched: 0, fractions of the labels' median object size and the schema default."""
    fractions = EMBEDDING_SIZE_FRACTIONS if decoder in EMBEDDING_DECODERS else SIZE_FRACTIONS
    default = config.section_defaults("segment")[SIZE_KEYS[decoder]]
    values = {int(round(f * median_size)) for f in fractions} | {int(default)}
    if decoder in POST_FILTER_SIZE:
        values.add(0)
    return sorted(values)


def threshold_points(decoder: str, heat: str) -> tuple[dict[str, list[Any]], list[dict[str, Any]]]:
    """(the threshold values per key, every combination of them that keeps seeds above the foreground)."""
    grid = THRESHOLD_GRID.get((decoder, heat)) or THRESHOLD_GRID[(decoder, PROBABILITY)]
    keys = list(grid)
    points = []
    for values in itertools.product(*(grid[key] for key in keys)):
        point = dict(zip(keys, values))
        if all(point[seed] >= point[fg] for seed, fg in SEED_ABOVE.items() if seed in point and fg in point):
            points.append(point)
    return {key: list(values) for key, values in grid.items()}, points


def grid_size(decoder: str, heat: str, median_size: int) -> tuple[int, int]:
    """(decodes per volume, points scored per volume) of ``tune``'s grid."""
    points = len(threshold_points(decoder, heat)[1])
    sizes = len(size_candidates(decoder, median_size))
    return (points, points * sizes) if decoder in POST_FILTER_SIZE else (points * sizes, points * sizes)


def size_filter(labels: np.ndarray, min_size: int) -> np.ndarray:
    """``labels`` (uint32 ids consecutive from 1) without the objects below ``min_size`` voxels, ids kept
    consecutive in order: what the watershed decoders' own minimum size does (a new array)."""
    sizes = np.bincount(labels.reshape(-1))
    return apply_lut(labels.copy(), keep_lut(sizes >= max(1, min_size)))


def distance_to(settings: Mapping[str, Any], reference: Mapping[str, Any]) -> tuple[int, float]:
    """How far ``settings`` lie from ``reference``: (keys that differ, the sum of their relative differences)."""
    differ = [key for key, value in settings.items() if value != reference[key]]
    return len(differ), float(sum(abs(settings[k] - reference[k]) / max(abs(reference[k]), 1.0) for k in differ))


def _chosen(trials: list[dict[str, Any]], reference: Mapping[str, Any]) -> int:
    """Index of the best trial: highest score, then F1 at IoU 0.5 (each to ``TIE``), then nearest ``reference``, then the first."""
    best = max(trial["score"] for trial in trials)
    tied = [i for i, trial in enumerate(trials) if trial["score"] >= best - TIE]
    best_f1 = max(trials[i]["instance_f1"] for i in tied)
    tied = [i for i in tied if trials[i]["instance_f1"] >= best_f1 - TIE]
    return min(tied, key=lambda i: (distance_to(trials[i]["settings"], reference), i))


def score(seg: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The metrics tuning ranks by: ``score`` (mean F1 over IoU 0.50..0.95) and ``instance_f1`` (at IoU 0.5), with the rest of ``evaluate_arrays``."""
    metrics = evaluate_arrays(seg, labels, IOU_THRESHOLD)
    return {**metrics, "score": float(np.mean(metrics["f1_at_iou"]))}


class _Decoder:
    """Decodes tune's volumes with one setting (``segment`` section + the point) and scores the result."""

    def __init__(self, volumes: list[TuneVolume], section: dict[str, Any], support: SupportSet | None, embedding_range: float):
        self.volumes, self.section, self.support, self.embedding_range = volumes, section, support, embedding_range

    def labels(self, volume: TuneVolume, point: dict[str, Any]) -> np.ndarray:
        return decode(volume.channels, {**self.section, **point}, support=self.support, embedding_range=self.embedding_range)

    def trial(self, settings: dict[str, Any], labels: list[np.ndarray]) -> dict[str, Any]:
        """The trial record of ``settings`` whose decoded volumes are ``labels``: means over the volumes, and each one's."""
        scores = [score(seg, volume.labels) for seg, volume in zip(labels, self.volumes)]
        return {
            "settings": dict(settings),
            "score": float(np.mean([s["score"] for s in scores])),
            "instance_f1": float(np.mean([s["instance_f1"] for s in scores])),
            "per_volume": [{"score": s["score"], "instance_f1": s["instance_f1"]} for s in scores],
        }


def _search(decoder: str, run: _Decoder, points: list[dict[str, Any]], sizes: list[int], progress: bool) -> list[dict[str, Any]]:
    """Every (threshold point, minimum size) trial, in grid order (thresholds outer, sizes inner)."""
    size_key, trials = SIZE_KEYS[decoder], []
    max_area = run.section["max_area_2d"]
    for point in tqdm(points, desc=f"tune {decoder}", unit="setting", file=sys.stderr, disable=not progress):
        if decoder in POST_FILTER_SIZE:  # decode once without the size and width filters, then filter per size
            decoded = [run.labels(v, {**point, size_key: 0, "max_area_2d": 0}) for v in run.volumes]
            for size in sizes:
                labels = [drop_wide_objects(size_filter(seg, size), max_area) for seg in decoded]
                trials.append(run.trial({**point, size_key: size}, labels))
        else:
            for size in sizes:
                settings = {**point, size_key: size}
                trials.append(run.trial(settings, [run.labels(v, settings) for v in run.volumes]))
    return trials


SUMMARY_KEYS = ("score", "instance_f1", "instance_precision", "instance_recall", "voxel_iou", "f1_2d", "gt_objects", "predicted_objects")


def _volume_summary(volume: TuneVolume, seg: np.ndarray) -> dict[str, Any]:
    metrics = score(seg, volume.labels)
    return {"name": volume.name, "slices": list(volume.slices), **{key: metrics[key] for key in SUMMARY_KEYS}}


def tune(
    volumes: list[TuneVolume],
    section: dict[str, Any],
    support: SupportSet | None = None,
    embedding_range: float = embedding.DEFAULT_EMBEDDING_RANGE,
    progress: bool = False,
) -> Tuned:
    """Choose ``TUNED_KEYS`` of the decoder that ``section["decoder"]`` runs on these volumes' channels.

    ``section``: a complete ``segment`` section: its other keys (blur, seed
    sizes, ``max_area_2d``, ...) are used as they are. ``support``: the
    support set ``nearest_neighbour`` needs. Every volume must have the same
    channel names. Returns the chosen settings with their score, the
    untuned settings' score, every trial, the grid and the volumes used.
    """
    if not volumes:
        raise EmmitoError("tuning needs at least one labelled volume: give train.volumes or train.validation")
    names = list(volumes[0].channels)
    if any(list(v.channels) != names for v in volumes):
        raise ValueError("every volume to tune on must have the same heat channels")
    decoder = resolve_decoder(section["decoder"], names)[0]
    heat = heat_kind(names)
    grid, points = threshold_points(decoder, heat)
    sizes = size_candidates(decoder, median_object_size(v.labels for v in volumes))
    grid[SIZE_KEYS[decoder]] = sizes
    run = _Decoder(volumes, section, support, embedding_range)
    trials = _search(decoder, run, points, sizes, progress)
    untuned = untuned_settings(decoder, heat)
    reference = run.trial(untuned, [run.labels(v, untuned) for v in volumes])
    candidates = [*trials, reference]  # the untuned settings compete too: a tie keeps them
    chosen = candidates[_chosen(candidates, untuned)]
    summaries = [_volume_summary(v, run.labels(v, chosen["settings"])) for v in volumes]
    return Tuned(decoder, heat, chosen, reference, grid, trials, summaries)


# ---- what segment runs with ------------------------------------------------------------


def resolve_settings(
    section: dict[str, Any],
    explicit: Iterable[str],
    tuned: Mapping[str, Any] | None,
    decoder: str,
    heat: str,
    source: str = "decoder.json",
) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``segment`` section to decode with, and where each tuned key's value came from.

    ``section``: complete (defaults filled); ``explicit``: the dotted key paths
    the user set (``segment.min_size``); ``tuned``: decoder.json's record (or
    None); ``decoder``: the decoder that runs (resolved, not ``auto``).
    Schema defaults < the tuned settings (when tuned for this decoder) < the
    user's keys; a tuned key neither tuned nor set takes ``untuned_settings``.
    Sources: ``config``, ``source`` (the decoder.json path), ``default``.
    """
    explicit = frozenset(explicit)
    chosen = dict(tuned["settings"]) if tuned is not None and tuned.get("decoder") == decoder else {}
    settings, sources = dict(section), {}
    for key in dict.fromkeys([*TUNED_KEYS.get(decoder, ()), *chosen]):
        if f"segment.{key}" in explicit:
            sources[key] = "config"
        elif key in chosen:
            settings[key], sources[key] = chosen[key], source
        else:
            settings[key], sources[key] = untuned_settings(decoder, heat).get(key, section[key]), "default"
    try:
        settings = config.with_defaults("segment", settings)
    except EmmitoError as exc:
        raise EmmitoError(f"{source}: {exc}: delete it and rerun the tune rule") from None
    return settings, sources


def describe(settings: Mapping[str, Any], sources: Mapping[str, str]) -> str:
    """One line naming each tuned key's value and where it came from, for the segment log."""
    return ", ".join(f"{key} {settings[key]:g} ({sources[key]})" for key in sources)
