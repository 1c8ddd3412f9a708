"""emmito summary: one screen on what a finished run produced, read from the results layout (contract.Results)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from emmito import cli, contract
from emmito.io import write_json
from emmito.labels import write_objects
from emmito.summary import summarize

METRICS = {
    "iou_threshold": 0.5, "instance_f1": 0.8571, "instance_precision": 1.0, "instance_recall": 0.75,
    "voxel_iou": 0.78125, "voxel_precision": 0.9, "voxel_recall": 0.85,
    "gt_objects": 4, "predicted_objects": 3, "matched_objects": 3,
    "ap50": 0.834983, "ap75": 0.50495, "ap_score": "mean_probability", "voi_split": 0.688722, "voi_merge": 0.0,
    "arand": 0.5, "size_tercile_bounds": [5, 13], "f1_small": 0.666667, "f1_medium": 0.5, "f1_large": 0.8,
}
CONFIG = {"model": {"name": "m1"}, "infer": {"volumes": ["done", "empty"]}}


def finished_volume(root: Path, vol: str) -> contract.Results:
    """A results tree under ``root`` in which volume ``vol`` went through every stage (tiny files)."""
    layout = contract.Results(str(root))
    contract.fixture(layout.seg(vol), "seg", np.zeros((2, 4, 4), np.uint32))
    objects = {str(i): {"voxels": 10 * i, "bbox": [0, 0, 0, 1, 1, 1], "blocks": [0]} for i in (1, 2, 3)}
    write_json(layout.id_map(vol), {"blocks": 1, "objects": objects, "id_map": {}})
    write_json(layout.metrics(vol), METRICS)
    rows = [dict.fromkeys(contract.OBJECT_COLUMNS, 0) for _ in range(3)]
    for i, row in enumerate(rows, start=1):
        row.update(id=i, voxels=10 * i, volume_um3=0.01 * i, length_um=0.5 * i, touches_edge=int(i == 3))
    write_objects(layout.objects(vol), rows)
    Path(layout.suggestions(vol)).write_text("rank\n")
    Path(layout.ome_zarr(vol)).mkdir(parents=True)
    Path(layout.neuroglancer(vol)).mkdir(parents=True)
    Path(layout.report_dir(vol)).mkdir(parents=True)
    Path(layout.logs()).mkdir(parents=True, exist_ok=True)
    return layout


def line(text: str, start: str) -> str:
    """The one line of ``text`` that starts with ``start`` (after the indent)."""
    found = [ln for ln in text.splitlines() if ln.strip().startswith(start)]
    assert len(found) == 1, (start, text)
    return found[0]


def test_a_finished_volume_shows_objects_metrics_and_paths(tmp_path):
    root = tmp_path / "results"
    layout = finished_volume(root, "done")
    text = summarize(CONFIG, root)
    assert line(text, "model").split()[1] == layout.checkpoint("m1")
    assert f"(training log: {layout.training_log('m1')})" in line(text, "model")
    assert line(text, "objects found").split() == ["objects", "found", "3"]
    assert line(text, "instance F1@IoU0.5").split()[-1] == "0.857"
    assert line(text, "instance recall").split()[-1] == "0.750"
    assert line(text, "voxel IoU").split()[-1] == "0.781"
    assert line(text, "matched_objects").split() == ["matched_objects", "3"]
    assert line(text, "gt_objects").split() == ["gt_objects", "4"]
    assert "2D instance F1" not in text  # not in metrics.json: no row
    assert line(text, "AP@IoU 0.50").split()[-1] == "0.835"
    assert line(text, "AP@IoU 0.75").split()[-1] == "0.505"
    assert line(text, "VOI split").split()[-1] == "0.689"
    assert line(text, "VOI merge").split()[-1] == "0.000"
    assert line(text, "adapted Rand error").split()[-1] == "0.500"
    assert line(text, "AP ranked by").split()[-1] == "mean_probability"
    assert line(text, "F1 small/medium/large").split()[2:7] == ["0.667", "/", "0.500", "/", "0.800"]
    assert "(gt terciles: < 5, < 13, >= 13 voxels)" in line(text, "F1 small/medium/large")
    done = text.split("volume 'empty'")[0]
    for label, path in (("segmentation", layout.seg("done")), ("id map", layout.id_map("done")),
                        ("metrics", layout.metrics("done")), ("neuroglancer export", layout.neuroglancer("done")),
                        ("report plots", layout.report_dir("done")), ("logs", layout.logs())):
        assert line(done, label).split()[-1] == path, label
    assert "missing" not in done
    assert line(done, "look at it").endswith(f"emmito view {layout.neuroglancer('done')}")
    assert line(done, "objects table").split()[-1] == layout.objects("done")
    assert line(done, "to proofread").split()[-1] == layout.suggestions("done")
    assert line(done, "first suggestion").endswith(f"emmito view {layout.neuroglancer('done')} --suggestion 1")
    assert line(done, "median object").split()[2:] == ["0.02", "µm³,", "1", "µm", "long", "(1", "of", "3", "cut", "by", "the", "volume's", "edge)"]


def test_a_volume_not_run_yet_is_marked_missing(tmp_path):
    root = tmp_path / "results"
    finished_volume(root, "done")
    empty = summarize(CONFIG, root).split("volume 'empty'")[1]
    layout = contract.Results(str(root))
    for label, path in (("segmentation", layout.seg("empty")), ("metrics", layout.metrics("empty")),
                        ("neuroglancer export", layout.neuroglancer("empty"))):
        assert line(empty, label).endswith(f"{path}  (missing: run snakemake)"), label
    assert line(empty, "logs").endswith(layout.logs())  # shared by all volumes, and there
    assert "objects found" not in empty and "instance F1" not in empty and "look at it" not in empty


def test_the_default_root_is_the_results_layouts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    finished_volume(Path(contract.RESULTS), "done")
    text = summarize(CONFIG).split("volume 'empty'")[0]
    assert line(text, "segmentation").split()[-1] == contract.Results().seg("done") == "results/done/seg.h5"
    assert line(text, "objects found").split()[-1] == "3"


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    volumes = {"done": {"images": "data/done/images"}, "empty": {"images": "data/empty/images"}}
    path.write_text(yaml.safe_dump({"volumes": volumes, **CONFIG}))
    return path


def test_cli_reads_the_results_root_it_is_given(tmp_path, config_file, capsys):
    root = tmp_path / "elsewhere" / "run1"
    layout = finished_volume(root, "done")
    assert cli.main(["summary", str(config_file), "--results", str(root)]) == 0
    out = capsys.readouterr().out.split("volume 'empty'")[0]
    assert line(out, "segmentation").split()[-1] == layout.seg("done")
    assert line(out, "objects found").split()[-1] == "3"
    assert line(out, "model").split()[1] == f"{root}/model/m1/checkpoint.pt"


def test_cli_without_results_reads_results_under_the_working_folder(tmp_path, config_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["summary", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert line(out.split("volume 'empty'")[0], "segmentation").endswith("results/done/seg.h5  (missing: run snakemake)")
