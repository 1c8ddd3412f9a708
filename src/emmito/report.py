"""Plots and a table for the Snakemake report (``snakemake --report report.html``), with matplotlib.

- training: loss and learning rate per iteration, validation IoU (metrics.jsonl);
- scores: precision, recall and F1 (instance and voxel), F1 against the IoU
  threshold, and the field's metrics: AP at IoU 0.50 / 0.75, F1 per object-size
  tercile, adapted Rand error and variation of information (metrics.json),
  plus metrics.json as an HTML table;
- volume: EM slices with the segmentation overlaid in colour (only the slices
  shown are read) and the per-object size histogram (trace.json);
- objects: the distributions of object volume and skeleton length (objects.csv,
  ``emmito measure``);
- decoder: the segment settings tuned for the model (decoder.json, ``emmito
  tune``) as an HTML page: the chosen values beside the untuned ones, the
  scores they reached on which volumes, and the best trials of the grid.

Every plot function takes plain Python/numpy data and a path to write; the
file readers around them are thin.
"""

from __future__ import annotations

import argparse
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from emmito import contract
from emmito.io import EmmitoError, atomic_path, open_volume, read_json, volume_attrs
from emmito.labels import read_objects
from emmito.resampling import mean_downsample

# Overlays are shown at most this many pixels wide or high; coarser levels of
# seg.h5's pyramid are read when they are large enough, so a 4k slice costs a 1k read.
OVERLAY_PIXELS = 1024
SEGMENT_OPACITY = 0.45


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise EmmitoError("the report plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, out: Path) -> None:
    """Save a figure as PNG atomically; no timestamp or version in it, so same data, same bytes."""
    plt = _pyplot()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)


def read_training_log(path: Path) -> list[dict[str, Any]]:
    """The records of a training metrics.jsonl (one JSON object per line)."""
    path = Path(path)
    if not path.exists():
        raise EmmitoError(f"{path}: file not found: run the training first (snakemake {path})")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise EmmitoError(f"{path}: line {number} is not JSON ({exc}): delete the file and rerun training") from None
    return records


def plot_training(records: list[dict[str, Any]], out: Path) -> None:
    """Loss (log scale) and learning rate against iteration; validation IoU where it was measured."""
    plt = _pyplot()
    figure, (loss_axis, val_axis) = plt.subplots(1, 2, figsize=(11, 4))
    iterations = [r["iteration"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    loss_axis.plot(iterations, losses, color="tab:blue", linewidth=1, label="training loss")
    if len(losses) >= 10:  # a running mean shows the trend through batch noise
        window = max(2, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        loss_axis.plot(iterations[window - 1 :], smooth, color="black", linewidth=1.5, label=f"mean of {window}")
    if losses and min(losses) > 0:
        loss_axis.set_yscale("log")
    loss_axis.set_xlabel("iteration")
    loss_axis.set_ylabel("loss")
    loss_axis.set_title("training loss")
    rates = [(r["iteration"], r["lr"]) for r in records if "lr" in r]
    if rates:
        rate_axis = loss_axis.twinx()
        rate_axis.plot(*zip(*rates), color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
        rate_axis.set_ylabel("learning rate", color="tab:gray")
    loss_axis.legend(loc="lower left", fontsize=8)
    validated = [(r["iteration"], r["val_iou"]) for r in records if r.get("val_iou") is not None]
    if validated:
        steps, ious = zip(*validated)
        val_axis.plot(steps, ious, marker="o", color="tab:green")
        best = int(np.argmax(ious))
        val_axis.annotate(f"best {ious[best]:.3f} @ {steps[best]}", (steps[best], ious[best]),
                          textcoords="offset points", xytext=(0, -14), fontsize=8,
                          ha="right" if best >= len(steps) / 2 else "left")
        val_axis.set_ylim(0, 1)
    else:
        val_axis.text(0.5, 0.5, "no validation volumes\n(train.validation is empty)", ha="center", va="center",
                      transform=val_axis.transAxes)
    val_axis.set_xlabel("iteration")
    val_axis.set_ylabel("voxel IoU")
    val_axis.set_title("validation")
    figure.tight_layout()
    _save(figure, out)


SCORE_BARS = (
    ("instance", "instance_precision", "instance_recall", "instance_f1"),
    ("voxel", "voxel_precision", "voxel_recall", "voxel_dice"),
)


# The field's metrics (metrics.json keys), as bars of one panel: AP, F1 per size tercile, adapted Rand error.
FIELD_BARS = (
    ("AP@.50", "ap50", "tab:purple"),
    ("AP@.75", "ap75", "tab:purple"),
    ("F1 small", "f1_small", "tab:green"),
    ("F1 medium", "f1_medium", "tab:green"),
    ("F1 large", "f1_large", "tab:green"),
    ("ARAND", "arand", "tab:red"),
)


def plot_field_metrics(axis: Any, metrics: dict[str, Any]) -> None:
    """AP at IoU 0.50/0.75, F1 per gt size tercile and the adapted Rand error as bars; VOI in the title.

    A key missing from ``metrics`` (an older metrics.json) or None (no ground
    truth to split into terciles) leaves its bar out.
    """
    shown = [(name, metrics[key], colour) for name, key, colour in FIELD_BARS if metrics.get(key) is not None]
    for x, (name, value, colour) in enumerate(shown):
        axis.bar(x, value, 0.6, color=colour)
        axis.text(x, value + 0.01, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(shown)))
    axis.set_xticklabels([name for name, _, _ in shown], rotation=30, ha="right", fontsize=8)
    axis.set_ylim(0, 1.15)
    bounds = metrics.get("size_tercile_bounds")
    ranked = {"mean_probability": "ranked by mean probability", "voxel_count": "ranked by size"}.get(metrics.get("ap_score"), "")
    notes = [ranked] + ([f"terciles at {bounds[0]:g}, {bounds[1]:g} voxels"] if bounds else [])
    axis.set_xlabel("; ".join(n for n in notes if n), fontsize=8)
    if "voi_split" in metrics and "voi_merge" in metrics:
        axis.set_title(f"VOI split {metrics['voi_split']:.3f}, merge {metrics['voi_merge']:.3f} bits", fontsize=10)
    else:
        axis.set_title("field metrics", fontsize=10)
    if not shown:
        axis.text(0.5, 0.5, "not in metrics.json\n(rerun evaluate)", ha="center", va="center", transform=axis.transAxes)


def plot_scores(metrics: dict[str, Any], out: Path) -> None:
    """Precision, recall and F1 bars (instance and voxel, values written on them), F1 against the IoU threshold,
    and the field's metrics (``plot_field_metrics``)."""
    plt = _pyplot()
    figure, (bar_axis, curve_axis, field_axis) = plt.subplots(1, 3, figsize=(16, 4), gridspec_kw={"width_ratios": [5, 5, 6]})
    width = 0.25
    for row, (group, *keys) in enumerate(SCORE_BARS):
        for column, (key, name, colour) in enumerate(zip(keys, ("precision", "recall", "F1"), ("tab:blue", "tab:orange", "tab:green"))):
            if key not in metrics:
                continue
            x = row + (column - 1) * width
            bar_axis.bar(x, metrics[key], width, color=colour, label=name if row == 0 else None)
            bar_axis.text(x, metrics[key] + 0.01, f"{metrics[key]:.2f}", ha="center", va="bottom", fontsize=8)
    bar_axis.set_xticks(range(len(SCORE_BARS)))
    threshold = metrics.get("iou_threshold")
    bar_axis.set_xticklabels([f"instances (IoU ≥ {threshold:g})" if threshold else "instances", "voxels (F1 = Dice)"])
    bar_axis.set_ylim(0, 1.25)
    bar_axis.set_ylabel("score")
    bar_axis.legend(loc="upper center", ncol=3, fontsize=8)
    counts = f"{metrics.get('matched_objects', '?')} of {metrics.get('gt_objects', '?')} objects matched, {metrics.get('predicted_objects', '?')} predicted"
    bar_axis.set_title(counts, fontsize=10)
    thresholds, f1s = metrics.get("f1_iou_thresholds"), metrics.get("f1_at_iou")
    if thresholds and f1s:
        curve_axis.plot(thresholds, f1s, marker="o", color="tab:green")
        curve_axis.set_xlim(min(thresholds) - 0.025, max(thresholds) + 0.025)
    curve_axis.set_ylim(0, 1.05)
    curve_axis.set_xlabel("IoU threshold for a match")
    curve_axis.set_ylabel("instance F1")
    curve_axis.set_title("F1 against IoU threshold")
    curve_axis.grid(alpha=0.3)
    plot_field_metrics(field_axis, metrics)
    figure.tight_layout()
    _save(figure, out)


def metrics_table(metrics: dict[str, Any], title: str = "metrics.json") -> str:
    """metrics.json as a standalone HTML page with one table (lists shown inline, floats to 4 digits)."""

    def shown(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, list):
            return ", ".join(shown(v) for v in value)
        return str(value)

    rows = "\n".join(
        f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(shown(value))}</td></tr>" for key, value in sorted(metrics.items())
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td{border:1px solid #ccc;padding:2px 8px}"
        "td:last-child{font-family:monospace;text-align:right}</style></head><body>\n"
        f"<h3>{html.escape(title)}</h3>\n<table>\n<tr><th>metric</th><th>value</th></tr>\n{rows}\n</table>\n</body></html>\n"
    )


_PAGE_STYLE = (
    "<style>body{font-family:sans-serif}table{border-collapse:collapse;margin-bottom:1em}"
    "td,th{border:1px solid #ccc;padding:2px 8px}td{font-family:monospace;text-align:right}"
    "td:first-child{font-family:sans-serif;text-align:left}</style>"
)
DECODER_TRIALS_SHOWN = 10


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return html.escape(f"{value:.4f}" if isinstance(value, float) else str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>\n"


def decoder_table(record: dict[str, Any], title: str = "decoder.json") -> str:
    """decoder.json (``emmito tune``'s record) as a standalone HTML page.

    The chosen value of each tuned key beside its untuned one, the score (F1
    over IoU 0.50..0.95) and F1 at IoU 0.5 of both, each volume tuned on (its
    slices and the chosen settings' metrics), and the best trials.
    """
    settings, untuned = record.get("settings", {}), record.get("untuned", {})
    before = untuned.get("settings", {})
    rows = [[key, settings[key], before.get(key, "")] for key in sorted(settings)]
    scores = [
        ["F1 over IoU 0.50-0.95 (the score)", record.get("score", ""), untuned.get("score", "")],
        ["instance F1 at IoU 0.5", record.get("instance_f1", ""), untuned.get("instance_f1", "")],
    ]
    volume_keys = ["score", "instance_f1", "instance_precision", "instance_recall", "voxel_iou", "f1_2d", "gt_objects", "predicted_objects"]
    volumes = [[v.get("name", "?"), "{}-{}".format(*v.get("slices", ["?", "?"])), *(v.get(k, "") for k in volume_keys)]
               for v in record.get("volumes", [])]
    trials = sorted(record.get("trials", []), key=lambda t: (-t.get("score", 0.0), -t.get("instance_f1", 0.0)))
    trial_rows = [[", ".join(f"{k} {t['settings'][k]:g}" for k in sorted(t["settings"])), t.get("score", ""), t.get("instance_f1", "")]
                  for t in trials[:DECODER_TRIALS_SHOWN]]
    names = ", ".join(v.get("name", "?") for v in record.get("volumes", []))
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>" + _PAGE_STYLE + "</head><body>\n"
        f"<h3>{html.escape(title)}</h3>\n<p>Decoder <b>{html.escape(str(record.get('decoder', '?')))}</b> "
        f"(target {html.escape(str(record.get('target', '?')))}), settings chosen on {html.escape(names)} "
        f"from {len(record.get('trials', []))} trials; a key set in the config overrides its tuned value.</p>\n"
        + _html_table(["setting", "tuned", "untuned"], rows)
        + _html_table(["score", "tuned", "untuned"], scores)
        + "<p>Volumes tuned on (the chosen settings):</p>\n"
        + _html_table(["volume", "slices", *volume_keys], volumes)
        + f"<p>The best {len(trial_rows)} trials:</p>\n"
        + _html_table(["settings", "score", "instance F1"], trial_rows)
        + "</body></html>\n"
    )


def overlay_slices(objects: dict[str, dict[str, Any]], depth: int, count: int) -> list[int]:
    """``count`` slice indices, evenly spread over the slices that hold objects (from trace.json bounding boxes).

    Falls back to evenly spread slices of the whole volume when there are no objects.
    """
    covered = np.zeros(depth, dtype=bool)
    for record in objects.values():
        z0, z1 = record["bbox"][0], record["bbox"][3]
        covered[max(0, z0) : min(depth, z1)] = True
    candidates = np.flatnonzero(covered) if covered.any() else np.arange(depth)
    if count >= len(candidates):
        return candidates.tolist()
    picks = np.linspace(0, len(candidates) - 1, count + 2)[1:-1] if count > 1 else [len(candidates) / 2]
    return sorted({int(candidates[int(round(p))]) for p in picks})


def label_colours(labels: np.ndarray) -> np.ndarray:
    """A fixed, well-spread RGB colour (float, 0..1) per label id, from the id alone."""
    hue = (labels.astype(np.float64) * 0.618033988749895) % 1.0
    import matplotlib.colors

    hsv = np.stack([hue, np.full_like(hue, 0.85), np.full_like(hue, 1.0)], axis=-1)
    return matplotlib.colors.hsv_to_rgb(hsv)


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """uint8 (y, x) image + uint (y, x) labels -> float RGB (y, x, 3): labels coloured over grey."""
    grey = np.repeat((image.astype(np.float64) / 255.0)[..., None], 3, axis=-1)
    inside = labels != 0
    blended = grey.copy()
    blended[inside] = (1 - SEGMENT_OPACITY) * grey[inside] + SEGMENT_OPACITY * label_colours(labels[inside])
    return blended


def plot_overlays(images: list[np.ndarray], labels: list[np.ndarray], slices: list[int], voxel_nm: float, out: Path) -> None:
    """One panel per slice: the EM image and its segmentation in colour. ``voxel_nm`` is the shown pixel's size."""
    plt = _pyplot()
    columns = min(len(slices), 2) or 1
    rows = max(1, math.ceil(len(slices) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 6 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, label, z in zip(axes.ravel(), images, labels, slices):
        axis.imshow(overlay(image, label), interpolation="nearest")
        objects = len(np.unique(label[label != 0]))
        axis.set_title(f"slice {z}, objects: {objects} ({voxel_nm:g} nm pixels)", fontsize=10)
    if not slices:
        axes[0, 0].text(0.5, 0.5, "empty volume", ha="center", va="center")
    figure.tight_layout()
    _save(figure, out)


def plot_sizes(voxels: list[int], out: Path, unit: str = "voxels") -> None:
    """Histogram of object sizes on log-spaced bins, with the median marked."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(7, 4))
    sizes = np.asarray(voxels, dtype=np.float64)
    if len(sizes):
        low, high = max(1.0, sizes.min()), max(2.0, sizes.max())
        bins = np.logspace(np.log10(low), np.log10(high * 1.001), min(40, max(5, len(sizes) // 3)) + 1)
        axis.hist(sizes, bins=bins, color="tab:blue", edgecolor="white")
        axis.set_xscale("log")
        median = float(np.median(sizes))
        axis.axvline(median, color="black", linestyle="--", linewidth=1)
        axis.text(median, axis.get_ylim()[1] * 0.95, f" median {median:.0f}", va="top", fontsize=8)
    else:
        axis.text(0.5, 0.5, "no objects", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel(f"object size ({unit})")
    axis.set_ylabel("objects")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title(f"{len(sizes)} objects")
    figure.tight_layout()
    _save(figure, out)


def _log_histogram(axis: Any, values: list[float], xlabel: str, colour: str) -> None:
    """Histogram of positive ``values`` on log-spaced bins, the median dashed; the count without one in the title."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    data = np.asarray(values, dtype=np.float64)
    positive = data[data > 0]
    if len(positive):
        low, high = positive.min(), positive.max()
        high = max(high * 1.001, low * 2)
        bins = np.logspace(np.log10(low), np.log10(high), min(40, max(5, len(positive) // 3)) + 1)
        axis.hist(positive, bins=bins, color=colour, edgecolor="white")
        axis.set_xscale("log")
        # 1, 2, 5 per decade in plain numbers: readable also where the values span less than a decade
        axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(NullFormatter())
        median = float(np.median(positive))
        axis.axvline(median, color="black", linestyle="--", linewidth=1)
        axis.text(median, axis.get_ylim()[1] * 0.95, f" median {median:.3g}", va="top", fontsize=8)
    else:
        axis.text(0.5, 0.5, "no objects", ha="center", va="center", transform=axis.transAxes)
    zero = len(data) - len(positive)
    axis.set_title(f"{len(data)} objects" + (f" ({zero} at 0, not shown)" if zero else ""), fontsize=10)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("objects")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))


def plot_objects(rows: list[dict[str, Any]], out: Path) -> None:
    """Distributions of object volume (µm³) and skeleton length (µm) from objects.csv rows, and how many are cut by the edge."""
    plt = _pyplot()
    figure, (volume_axis, length_axis) = plt.subplots(1, 2, figsize=(11, 4))
    _log_histogram(volume_axis, [r["volume_um3"] for r in rows], "volume (µm³)", "tab:blue")
    _log_histogram(length_axis, [r["length_um"] for r in rows], "length along the skeleton (µm)", "tab:orange")
    cut = sum(int(r["touches_edge"]) for r in rows)
    if cut:
        figure.suptitle(f"{cut} of {len(rows)} objects touch the volume's edge: their sizes are lower bounds", fontsize=9)
    figure.tight_layout()
    _save(figure, out)


def _read_overlay_slices(seg_path: Path, image_path: Path, slices: list[int]) -> tuple[list[np.ndarray], list[np.ndarray], int]:
    """The shown slices of image and segmentation, reduced to at most OVERLAY_PIXELS, and the reduction factor.

    The segmentation comes from the coarsest pyramid level of seg.h5 that is
    still at least OVERLAY_PIXELS (or the nearest stride of the full resolution);
    the image is strided to match.
    """
    import h5py

    with open_volume(seg_path) as full, open_volume(image_path) as image:
        if tuple(full.shape) != tuple(image.shape):
            raise EmmitoError(f"{seg_path} is {tuple(full.shape)} but {image_path} is {tuple(image.shape)}: they are of different volumes")
        size = max(full.shape[1:])
        levels = contract.pyramid_levels(full.file)
        level = 0
        while size / 2 ** (level + 1) >= OVERLAY_PIXELS and level + 1 < len(levels):
            level += 1
        seg_source: h5py.Dataset = full.file[levels[level]]
        factor = 2**level
        extra = max(1, math.ceil(max(seg_source.shape[1:]) / OVERLAY_PIXELS))
        images, labels = [], []
        for z in slices:
            picture = image[z : z + 1]
            for _ in range(level):
                picture = mean_downsample(picture)
            images.append(picture[0, ::extra, ::extra])
            labels.append(seg_source[z, ::extra, ::extra])
    return images, labels, factor * extra


def report_volume(seg_path: Path, image_path: Path, trace_path: Path, overlays_png: Path, sizes_png: Path, count: int) -> None:
    """Overlays of ``count`` slices and the size histogram of one segmented volume."""
    record = read_json(trace_path)
    objects = record.get("objects", {})
    with open_volume(seg_path) as seg:
        depth = seg.shape[0]
        voxel_size = contract.voxel_size(volume_attrs(seg))
    slices = overlay_slices(objects, depth, count)
    images, labels, factor = _read_overlay_slices(seg_path, image_path, slices)
    plot_overlays(images, labels, slices, voxel_size[2] * factor, overlays_png)
    plot_sizes([o["voxels"] for o in objects.values()], sizes_png, unit="voxels at inference resolution")


def run_cli(args: argparse.Namespace, params: dict[str, Any]) -> None:
    """``emmito report [--training JSONL PNG] [--scores JSON PNG HTML] [--volume SEG IMAGE TRACE PNG PNG] [--decoder JSON HTML] [--objects CSV PNG]``."""
    decoder, objects = getattr(args, "decoder", None), getattr(args, "objects", None)
    if not (args.training or args.scores or args.volume or decoder or objects):
        raise EmmitoError("emmito report: nothing to do: give --training, --scores, --volume, --decoder and/or --objects")
    if args.training:
        jsonl, png = map(Path, args.training)
        plot_training(read_training_log(jsonl), png)
    if args.scores:
        metrics_path, png, table = map(Path, args.scores)
        metrics = read_json(metrics_path)
        plot_scores(metrics, png)
        with atomic_path(table) as tmp:
            tmp.write_text(metrics_table(metrics, title=str(metrics_path)))
    if args.volume:
        seg, image, trace, overlays_png, sizes_png = map(Path, args.volume)
        report_volume(seg, image, trace, overlays_png, sizes_png, args.overlays)
    if objects:
        plot_objects(read_objects(objects[0]), Path(objects[1]))
    if decoder:
        settings_path, table = map(Path, decoder)
        with atomic_path(table) as tmp:
            tmp.write_text(decoder_table(contract.load_decoder_settings(settings_path), title=str(settings_path)))
