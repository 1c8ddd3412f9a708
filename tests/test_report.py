"""Report plots and table (emmito report) and the Snakemake report built from them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter)
import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from emmito import contract, labels, report  # noqa: E402
from emmito.io import EmmitoError, write_json  # noqa: E402
from emmito.metrics import F1_IOU_THRESHOLDS  # noqa: E402
from emmito.resampling import downsample_mode  # noqa: E402

METRICS = {
    "voxel_precision": 0.91, "voxel_recall": 0.85, "voxel_iou": 0.78, "voxel_dice": 0.88,
    "iou_threshold": 0.5, "gt_objects": 4, "predicted_objects": 3, "matched_objects": 3,
    "instance_precision": 1.0, "instance_recall": 0.75, "instance_f1": 0.857142,
    "f1_iou_thresholds": F1_IOU_THRESHOLDS, "f1_at_iou": [0.86, 0.86, 0.86, 0.8, 0.7, 0.6, 0.5, 0.3, 0.1, 0.0],
    "ap50": 0.8349, "ap75": 0.505, "ap_score": "mean_probability", "voi_split": 0.1234, "voi_merge": 0.0567,
    "arand": 0.0812, "size_tercile_bounds": [120, 900], "f1_small": 0.667, "f1_medium": 1.0, "f1_large": 0.8,
    "gt_objects_by_size": [1, 1, 2], "predicted_objects_by_size": [1, 1, 1], "matched_objects_by_size": [1, 1, 1],
}


DECODER = {
    "decoder": "heat_watershed", "heat": "probability", "target": "binary",
    "settings": {"foreground_threshold": 160, "seed_threshold": 200, "min_size": 250},
    "score": 0.8426, "instance_f1": 0.9362,
    "untuned": {"settings": {"foreground_threshold": 128, "seed_threshold": 150, "min_size": 1000}, "score": 0.61, "instance_f1": 0.7},
    "volumes": [{"name": "val", "slices": [0, 24], "score": 0.8426, "instance_f1": 0.9362, "instance_precision": 1.0,
                 "instance_recall": 0.88, "voxel_iou": 0.97, "f1_2d": 0.93, "gt_objects": 16, "predicted_objects": 14}],
    "trials": [
        {"settings": {"foreground_threshold": 128, "seed_threshold": 160, "min_size": 250}, "score": 0.80, "instance_f1": 0.93},
        {"settings": {"foreground_threshold": 160, "seed_threshold": 200, "min_size": 250}, "score": 0.8426, "instance_f1": 0.9362},
    ],
}


def object_rows(n: int = 40) -> list[dict]:
    """objects.csv rows: volumes spread over two decades, lengths 0 (a one-voxel object) to 4 um, two cut by the edge."""
    rows = []
    for i in range(1, n + 1):
        row = {column: 0 for column in contract.OBJECT_COLUMNS}
        row.update(id=i, voxels=100 * i, volume_um3=0.001 * i**1.5, length_um=0.0 if i == 1 else 0.1 * i,
                   touches_edge=int(i in (5, 9)))
        rows.append(row)
    return rows


def training_records(n: int = 30, validate_every: int | None = 10) -> list[dict]:
    records = []
    for iteration in range(1, n + 1):
        record = {"iteration": iteration, "loss": round(0.7 * 0.9**iteration + 0.01, 6), "lr": 0.002}
        if validate_every and iteration % validate_every == 0:
            record["val_iou"] = round(iteration / (n + 5), 4)
        records.append(record)
    return records


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as picture:
        picture.verify()
    with Image.open(path) as picture:
        return picture.size


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A 12 x 48 x 40 segmented volume: objects in slices 2..9 only, seg.h5 with s1 and s2, trace.json."""
    folder = tmp_path_factory.mktemp("report")
    image = np.full((12, 48, 40), 200, dtype=np.uint8)
    seg = np.zeros(image.shape, np.uint32)
    seg[2:6, 4:20, 4:20] = 1
    seg[5:10, 24:44, 10:36] = 2
    contract.fixture(folder / "image.h5", "image", image, voxel_size=[40, 8, 8])
    contract.fixture(folder / "seg.h5", "seg", seg, voxel_size=[40, 8, 8])
    with h5py.File(folder / "seg.h5", "a") as f:
        f.create_dataset(contract.level_name(1), data=downsample_mode(seg))
        f.create_dataset(contract.level_name(2), data=downsample_mode(downsample_mode(seg)))
    objects = {
        "1": {"voxels": 1024, "bbox": [2, 4, 4, 6, 20, 20], "blocks": [0]},
        "2": {"voxels": 2600, "bbox": [5, 24, 10, 10, 44, 36], "blocks": [0]},
    }
    write_json(folder / "trace.json", {"blocks": 1, "objects": objects, "id_map": {}})
    write_json(folder / "metrics.json", METRICS)
    labels.write_objects(folder / "objects.csv", object_rows())
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in training_records()))
    contract.save_decoder_settings(folder / "decoder.json", DECODER)
    return folder


def test_decoder_table_shows_the_tuned_values_their_scores_and_volumes(volume, tmp_path):
    page = report.decoder_table(contract.load_decoder_settings(volume / "decoder.json"), title="decoder.json")
    assert page == report.decoder_table(DECODER, title="decoder.json")  # same record, same bytes
    assert "<b>heat_watershed</b>" in page and "settings chosen on val from 2 trials" in page
    assert "<tr><td>foreground_threshold</td><td>160</td><td>128</td></tr>" in page
    assert "<tr><td>min_size</td><td>250</td><td>1000</td></tr>" in page
    assert "<td>0.8426</td><td>0.6100</td>" in page and "<td>val</td><td>0-24</td>" in page
    # the best trial first
    assert page.index("foreground_threshold 160, min_size 250, seed_threshold 200") < page.index("foreground_threshold 128, min_size 250")
    out = tmp_path / "decoder.html"
    result = subprocess.run([sys.executable, "-m", "emmito.cli", "report", "--decoder", str(volume / "decoder.json"), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == report.decoder_table(DECODER, title=str(volume / "decoder.json"))


def test_training_plot_is_a_png_and_deterministic(tmp_path):
    report.plot_training(training_records(), tmp_path / "a.png")
    report.plot_training(training_records(), tmp_path / "b.png")
    assert png_size(tmp_path / "a.png") == (1100, 400)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    report.plot_training(training_records(validate_every=None), tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes() != (tmp_path / "a.png").read_bytes()


@pytest.mark.bad_input
def test_broken_training_log_names_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 1, "loss": 0.5}\n{"iteration": 2, "lo\n')
    with pytest.raises(EmmitoError, match=r"metrics.jsonl: line 2 is not JSON"):
        report.read_training_log(tmp_path / "metrics.jsonl")


def test_object_distributions_are_a_png_and_deterministic(volume, tmp_path):
    rows = labels.read_objects(volume / "objects.csv")
    report.plot_objects(rows, tmp_path / "a.png")
    report.plot_objects(rows, tmp_path / "b.png")
    assert png_size(tmp_path / "a.png") == (1100, 400)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    picture = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).astype(int)
    left, right = picture[:, :550], picture[:, 550:]
    blue = (left[..., 2] > 150) & (left[..., 0] < 100)  # tab:blue bars: volume
    orange = (right[..., 0] > 200) & (right[..., 2] < 100)  # tab:orange bars: length
    assert blue.sum() > 2000 and orange.sum() > 2000
    report.plot_objects(rows[:10], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes() != (tmp_path / "a.png").read_bytes()
    report.plot_objects([], tmp_path / "empty.png")  # no objects: a plot that says so
    assert png_size(tmp_path / "empty.png") == (1100, 400)


def test_scores_plot_and_table(tmp_path):
    report.plot_scores(METRICS, tmp_path / "scores.png")
    assert png_size(tmp_path / "scores.png") == (1600, 400)
    report.plot_scores(METRICS, tmp_path / "again.png")
    assert (tmp_path / "scores.png").read_bytes() == (tmp_path / "again.png").read_bytes()
    # The field's panel (right): AP bars in tab:purple (148, 103, 189), ARAND in tab:red (214, 39, 40).
    picture = np.asarray(Image.open(tmp_path / "scores.png").convert("RGB")).astype(int)
    field = picture[:, 1100:]
    purple = (abs(field[..., 0] - 148) < 8) & (abs(field[..., 1] - 103) < 8) & (abs(field[..., 2] - 189) < 8)
    red = (abs(field[..., 0] - 214) < 8) & (abs(field[..., 1] - 39) < 8) & (abs(field[..., 2] - 40) < 8)
    assert purple.sum() > 1000 and red.sum() > 50
    # An older metrics.json (without the field's keys) still plots.
    old = {k: v for k, v in METRICS.items() if k not in ("ap50", "ap75", "voi_split", "voi_merge", "arand")}
    report.plot_scores({**old, "f1_small": None, "size_tercile_bounds": None}, tmp_path / "old.png")
    assert png_size(tmp_path / "old.png") == (1600, 400)
    table = report.metrics_table({**METRICS, "note": "<b>"}, title="results/v/metrics.json")
    assert "<td>instance_f1</td><td>0.8571</td>" in table
    assert "<td>ap50</td><td>0.8349</td>" in table and "<td>voi_split</td><td>0.1234</td>" in table
    assert "<td>arand</td><td>0.0812</td>" in table and "<td>ap_score</td><td>mean_probability</td>" in table
    assert "<td>gt_objects</td><td>4</td>" in table
    assert "0.5000, 0.5500, 0.6000" in table  # lists inline
    assert "&lt;b&gt;" in table and "<b>" not in table
    assert table.count("<tr>") == len(METRICS) + 2  # header + the extra key


def test_overlay_slices_spread_over_slices_with_objects():
    objects = {"1": {"bbox": [10, 0, 0, 20, 5, 5]}, "2": {"bbox": [30, 0, 0, 41, 5, 5]}}
    slices = report.overlay_slices(objects, depth=100, count=4)
    assert len(slices) == 4 and slices == sorted(slices)
    assert all(10 <= z < 20 or 30 <= z < 41 for z in slices)
    assert report.overlay_slices({}, depth=10, count=3) == [2, 4, 7]
    assert report.overlay_slices(objects, depth=100, count=50) == list(range(10, 20)) + list(range(30, 41))


def test_overlay_colours_only_labelled_pixels():
    image = np.array([[100, 100], [100, 100]], dtype=np.uint8)
    labels = np.array([[0, 5], [7, 5]], dtype=np.uint32)
    rgb = report.overlay(image, labels)
    assert np.allclose(rgb[0, 0], 100 / 255)  # background stays grey
    assert np.allclose(rgb[0, 1], rgb[1, 1])  # same id, same colour
    assert not np.allclose(rgb[0, 1], rgb[1, 0])  # different ids differ
    assert np.ptp(rgb[0, 1]) > 0.1  # coloured, not grey


def test_overlays_read_a_pyramid_level_for_large_slices(volume, monkeypatch):
    monkeypatch.setattr(report, "OVERLAY_PIXELS", 12)
    images, labels, factor = report._read_overlay_slices(volume / "seg.h5", volume / "image.h5", [5])
    assert factor == 4  # s2 (12 x 10) is the coarsest level still >= 12 pixels
    assert labels[0].shape == images[0].shape == (12, 10)
    with h5py.File(volume / "seg.h5") as f:
        assert np.array_equal(labels[0], f["s2"][5])


def test_cli_writes_every_plot(volume, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "emmito.cli", "report",
         "--training", str(volume / "metrics.jsonl"), str(out / "training.png"),
         "--scores", str(volume / "metrics.json"), str(out / "scores.png"), str(out / "metrics.html"),
         "--volume", str(volume / "seg.h5"), str(volume / "image.h5"), str(volume / "trace.json"),
         str(out / "overlays.png"), str(out / "sizes.png"), "--overlays", "2",
         "--objects", str(volume / "objects.csv"), str(out / "objects.png")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.html", "objects.png", "overlays.png", "scores.png", "sizes.png", "training.png"]
    assert png_size(out / "overlays.png") == (1200, 600)  # two panels side by side
    overlays = np.asarray(Image.open(out / "overlays.png").convert("RGB")).astype(int)
    assert (np.ptp(overlays, axis=-1) > 60).sum() > 10_000, "no coloured segmentation in the overlays"


@pytest.mark.workflow
@pytest.mark.slow
def test_snakemake_report_builds(volume, tmp_path):
    """The report rules on ready-made stage outputs (--allowed-rules keeps the other stages out), then --report."""
    from tinyproject import REPO, make_project, snakemake

    project = make_project(tmp_path / "project")
    if not (project / "report").exists():
        shutil.copytree(REPO / "report", project / "report")
    results = project / "results"
    (results / "deploy").mkdir(parents=True)
    (results / "model/tiny").mkdir(parents=True)
    for name in ("image.h5", "seg.h5", "trace.json", "metrics.json", "objects.csv"):
        shutil.copy2(volume / name, results / "deploy" / name)
    shutil.copy2(volume / "metrics.jsonl", results / "model/tiny/metrics.jsonl")
    shutil.copy2(volume / "decoder.json", results / "model/tiny/decoder.json")
    targets = [
        "results/model/tiny/report/training.png",
        "results/model/tiny/report/decoder.html",
        *(f"results/deploy/report/{name}" for name in ("overlays.png", "sizes.png", "scores.png", "metrics.html", "objects.png")),
    ]
    allowed = ["--allowed-rules", "report_training", "report_decoder", "report_scores", "report_volume", "report_objects", "--"]
    snakemake(project, "--cores", "2", *allowed, *targets)
    result = snakemake(project, "--report", "report.html", *allowed, *targets)
    assert "Report created" in result.stderr
    page = (project / "report.html").read_text()
    for name in ("training.png", "decoder.html", "overlays.png", "sizes.png", "scores.png", "metrics.html", "objects.png"):
        assert name in page, f"{name} missing from the report"
    for category in ("Training", "Evaluation", "Segmentation"):
        assert category in page
