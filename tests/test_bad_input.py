"""The catalogue of expected user mistakes (issue #7).

Every case feeds emmito one bad input and checks what the user sees: exit
status 2 and exactly one line on stderr (progress bars aside), no traceback,
naming the file or config key at fault and saying how to fix it; and that no
output file, nor a temporary one, is left behind. Most cases run the real
``emmito`` command in a subprocess; the config cases go through ``emmito.config``
and ``snakemake -n`` on a tiny project; the disk-full cases patch the process
and so call ``emmito.cli.main`` in-process.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import formats
import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter)
import numpy as np
import pytest
import yaml
from PIL import Image
from tinyproject import EMMITO, REPO, TINY_CONFIG, merged, snakemake

from emmito import config as cfg
from emmito import contract, io
from emmito.cli import main
from emmito.io import EmmitoError

pytestmark = pytest.mark.bad_input

VOXEL = ["--voxel-size", "40", "8", "8"]
# Heat blocks of a 12-slice volume at full resolution, one foreground channel (contract.fixture).
HEAT_DEPTH = 12
# A tqdm line as it ends up in a log: "desc:  50%|#####     | 2/4 [00:00<00:00, 9.1slice/s]".
TQDM_LINE = re.compile(r"(\|.*\| *\d+/\d+|\d+\w* \[\d\d:\d\d)")


# ---- helpers --------------------------------------------------------------------------


def emmito(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([EMMITO, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=cwd)


def error_line(stderr: str, verb: str) -> str:
    """The one error line a user reads, checking that stderr holds nothing else but progress.

    Progress bars and the stage's own status lines (``emmito segment: 3 objects ...``)
    may come first; then exactly one ``emmito VERB: error: ...`` line ends the output.
    """
    assert "Traceback" not in stderr, stderr
    # What a terminal shows of each line: the text after its last carriage return.
    shown = [line.rsplit("\r", 1)[-1].strip() for line in stderr.split("\n")]
    lines = [line for line in shown if line and not TQDM_LINE.search(line)]
    errors = [line for line in lines if line.startswith(f"emmito {verb}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line at the end, got:\n{stderr}"
    for line in lines[:-1]:
        assert line.startswith((f"emmito {verb}: ", f"{verb}: ")), f"not a status line: {line}"
    return errors[0]


def files_under(folder: Path) -> list[str]:
    """Every file below ``folder``, hidden ones (temporary files) included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir()) if folder.exists() else []


def assert_refused(result: subprocess.CompletedProcess, verb: str, words: list[str], out_dir: Path) -> str:
    """Exit 2, one line naming ``words``, and nothing written under ``out_dir``."""
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stderr}"
    line = error_line(result.stderr, verb)
    for word in words:
        assert word in line, f"{word!r} not in: {line}"
    assert files_under(out_dir) == [], f"left behind: {files_under(out_dir)}"
    return line


def write_png(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path) if mode else Image.fromarray(pixels).save(path)
    return path


def grey_stack(folder: Path, count: int = 4, size: tuple[int, int] = (16, 16), stem: str = "slice_", first: int = 0) -> Path:
    rng = np.random.default_rng(len(str(folder)))
    for i in range(first, first + count):
        write_png(folder / f"{stem}{i:03d}.png", rng.integers(0, 256, size, dtype=np.uint8))
    return folder


def mask_stack(folder: Path, count: int = 4, size: tuple[int, int] = (16, 16)) -> Path:
    for i in range(count):
        mask = np.zeros(size, np.uint8)
        mask[4:9, 4:9] = 255
        write_png(folder / f"mask_{i:03d}.png", mask)
    return folder


def convert(tmp_path: Path, images: Path, *extra: str | Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    label_args = ["--label-out", out / "label.h5"] if "--labels" in extra else []
    result = emmito("convert", "--images", images, *extra, *VOXEL, "--image-out", out / "image.h5", *label_args)
    return result, out


def heat_block(path: Path, heat: np.ndarray, offset: int = 0) -> Path:
    return contract.fixture(path, "heat", heat, offset=offset, volume_depth=HEAT_DEPTH)


def run_main(argv: list[str], capfd: pytest.CaptureFixture) -> tuple[int, str]:
    """``emmito.cli.main`` in this process -> (exit status, stderr)."""
    status = main([str(a) for a in argv])
    return status, capfd.readouterr().err


# ---- slices and labels: each case makes one bad input for convert ---------------------------
# A case is (make, words): make(tmp_path) -> (images, extra convert arguments), then convert
# must refuse with one line holding every word ("{tmp}" stands for tmp_path).


def _missing_slice_number(tmp_path):
    images = grey_stack(tmp_path / "em")
    (images / "slice_002.png").unlink()
    return images, []


def _duplicate_slice_number(tmp_path):
    images = grey_stack(tmp_path / "em")
    shutil.copy(images / "slice_001.png", images / "slice_1.png")
    return images, []


def _no_slices_in_the_folder(tmp_path):
    (tmp_path / "em").mkdir()
    (tmp_path / "em" / "notes.txt").write_text("not a slice")
    return tmp_path / "em", []


def _glob_that_matches_nothing(tmp_path):
    return tmp_path / "em" / "images.*.png", []


def _slice_without_a_number(tmp_path):
    images = grey_stack(tmp_path / "em")
    shutil.copy(images / "slice_000.png", images / "overview.png")
    return images, []


def _mixed_slice_sizes(tmp_path):
    images = grey_stack(tmp_path / "em", count=5)
    write_png(images / "slice_003.png", np.zeros((16, 14), np.uint8))
    return images, []


def _rgb_with_differing_channels(tmp_path):
    images = grey_stack(tmp_path / "em")
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 0] = 200  # a red tint: a colour image, not EM
    write_png(images / "slice_002.png", colour)
    return images, []


def _truncated_png(tmp_path):
    images = grey_stack(tmp_path / "em", size=(64, 64))
    data = (images / "slice_002.png").read_bytes()
    (images / "slice_002.png").write_bytes(data[: len(data) // 2])  # the header survives, the pixels do not
    return images, []


def _jpeg_named_png(tmp_path):
    images = grey_stack(tmp_path / "em")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(images / "slice_001.png", format="JPEG")
    return images, []


def _binary_labels_with_stray_values(tmp_path):
    images, labels = grey_stack(tmp_path / "em"), mask_stack(tmp_path / "lab")
    mask = np.zeros((16, 16), np.uint8)
    mask[2:6, 2:6], mask[6, 2:6] = 255, 128  # an anti-aliased edge
    write_png(labels / "mask_001.png", mask)
    return images, ["--labels", labels, "--label-format", "binary"]


def _label_count_differs(tmp_path):
    images, labels = grey_stack(tmp_path / "em", count=4), mask_stack(tmp_path / "lab", count=3)
    return images, ["--labels", labels]


def _label_size_differs(tmp_path):
    images, labels = grey_stack(tmp_path / "em"), mask_stack(tmp_path / "lab", size=(16, 12))
    return images, ["--labels", labels]


def _grey_labels_declared_as_vast(tmp_path):
    images, labels = grey_stack(tmp_path / "em"), mask_stack(tmp_path / "lab")
    return images, ["--labels", labels, "--label-format", "vast"]


def _hdf5_dataset_missing(tmp_path):
    formats.hdf5(tmp_path / "em.h5", "em/raw", np.zeros((4, 16, 16), np.uint8))
    return f"{tmp_path}/em.h5:/em/rwa", []


def _hdf5_not_3d(tmp_path):
    return formats.hdf5(tmp_path / "em.h5", "em", np.zeros((2, 4, 16, 16), np.uint8)), []


def _garbage_named_h5_input(tmp_path):
    (tmp_path / "em.h5").write_text("not HDF5 at all\n")
    return f"{tmp_path}/em.h5:/em", []


def _zarr_path_missing(tmp_path):
    formats.zarr_array(tmp_path / "em.zarr", "s0", np.zeros((4, 16, 16), np.uint8))
    return f"{tmp_path}/em.zarr:/s9", []


def _colour_tiff_slice(tmp_path):
    rgb = np.zeros((4, 16, 16, 3), np.uint8)
    rgb[2, ..., 0] = 200
    return formats.tiff_slices(tmp_path / "em", rgb), []


def _truncated_tiff_stack(tmp_path):
    stack = formats.tiff_stack(tmp_path / "em.tif", np.random.default_rng(0).integers(0, 4096, (6, 32, 32), dtype=np.uint16))
    data = Path(stack).read_bytes()
    Path(stack).write_bytes(data[: len(data) // 2])
    return stack, []


def _hdf5_labels_one_slice_short(tmp_path):
    images = formats.tiff_stack(tmp_path / "em.tif", np.zeros((4, 16, 16), np.uint8))
    labels = formats.hdf5(tmp_path / "lab.h5", "ids", np.zeros((3, 16, 16), np.uint32))
    return images, ["--labels", labels, "--label-format", "instance"]


def _vast_labels_from_zarr(tmp_path):
    images = grey_stack(tmp_path / "em")
    labels = formats.zarr_array(tmp_path / "lab.zarr", "ids", np.zeros((4, 16, 16), np.uint32))
    return images, ["--labels", labels, "--label-format", "vast"]


def _percentiles_the_wrong_way_round(tmp_path):
    images = formats.tiff_stack(tmp_path / "em.tif", np.zeros((4, 16, 16), np.uint16))
    return images, ["--params", json.dumps({"convert": {"percentiles": [99.9, 0.1]}})]


def _bad_last_label(tmp_path):
    """The image is streamed first; a bad last label must not leave a finished-looking image.h5."""
    images, labels = grey_stack(tmp_path / "em"), mask_stack(tmp_path / "lab")
    write_png(labels / "mask_003.png", np.full((16, 16), 7, np.uint8))
    return images, ["--labels", labels]


@pytest.mark.parametrize(
    "make, words",
    [
        # numbering, count, size
        (_missing_slice_number, ["slice number 2 is missing between slice_001.png and slice_003.png", "add the missing slice"]),
        (_duplicate_slice_number, ["slice_001.png and slice_1.png both have slice number 1", "keep one of them"]),
        (_no_slices_in_the_folder, ["folder {tmp}/em: no .png or .tif files in it", "point to the folder"]),
        (_glob_that_matches_nothing, ["no .png or .tif files match", "check the path"]),
        (_slice_without_a_number, ["overview.png has no number in its name", "rename it"]),
        (_mixed_slice_sizes, ["slice 003", "slice_003.png", "is 14x16 (width x height), the others are 16x16: crop or pad it"]),
        # pixel formats
        (_rgb_with_differing_channels, ["slice_002.png", "is colour (channels differ): export it as greyscale"]),
        (_truncated_png, ["slice_002.png: not a readable PNG", "re-export it"]),
        (_jpeg_named_png, ["slice_001.png: not a readable PNG (no PNG header", "re-export it as PNG"]),
        # labels
        (_binary_labels_with_stray_values, ["mask_001.png: binary mask", "other than 0/1/255: 128", "export a clean 0/255"]),
        (_label_count_differs, ["3 label slices", "but 4 image slices", "give one label slice per image slice"]),
        (_label_size_differs, ["are 12x16 but image slices", "are 16x16", "match the images pixel for pixel"]),
        (_grey_labels_declared_as_vast, ["mask_000.png: label_format vast needs RGB PNGs", "use label_format instance"]),
        (_bad_last_label, ["mask_003.png: binary mask", ": 7:"]),
        # other input formats
        (_hdf5_dataset_missing, ["{tmp}/em.h5: no dataset /em/rwa in it (it holds /em/raw)", "fix the path after the colon"]),
        (_hdf5_not_3d, ["{tmp}/em.h5:/em: a 4D array (shape (2, 4, 16, 16)), not 3D (z, y, x)", "one channel"]),
        (_garbage_named_h5_input, ["{tmp}/em.h5: not a readable HDF5 file", "re-export it"]),
        (_zarr_path_missing, ["{tmp}/em.zarr: no array at /s9 in it (it holds /s0)", "fix the path after the colon"]),
        (_colour_tiff_slice, ["slice_002.tif", "is colour (channels differ): export it as greyscale"]),
        (_truncated_tiff_stack, ["{tmp}/em.tif", "corrupt or truncated; re-export it"]),
        (_hdf5_labels_one_slice_short, ["3 label slices ({tmp}/lab.h5:/ids) but 4 image slices", "one label slice per image slice"]),
        (_vast_labels_from_zarr, ["lab.zarr:/ids: label_format vast reads RGB PNG or TIFF slices", "use label_format instance"]),
        (_percentiles_the_wrong_way_round, ["convert.percentiles [99.9, 0.1]", "low percentile must be below the high one"]),
    ],
    ids=[
        "missing-slice-number", "duplicate-slice-number", "no-slices-in-the-folder", "glob-that-matches-nothing",
        "slice-without-a-number", "mixed-slice-sizes", "rgb-with-differing-channels", "truncated-png", "jpeg-named-png",
        "binary-labels-with-stray-values", "label-count-differs", "label-size-differs", "grey-labels-declared-as-vast",
        "bad-last-label-leaves-neither-output", "hdf5-dataset-missing", "hdf5-not-3d", "garbage-named-h5-input",
        "zarr-path-missing", "colour-tiff-slice", "truncated-tiff-stack", "hdf5-labels-one-slice-short",
        "vast-labels-from-zarr", "percentiles-the-wrong-way-round",
    ],
)
def test_bad_slices_are_refused_in_one_line(tmp_path, make, words):
    images, extra = make(tmp_path)
    result, out = convert(tmp_path, images, *extra)
    assert_refused(result, "convert", [word.format(tmp=tmp_path) for word in words], out)


def test_16_bit_slices_are_scaled_by_dropping_the_low_byte_with_intensity_shift(tmp_path):
    """convert.intensity shift (the rule before issue 16): value >> 8, the same rule for every slice."""
    rng = np.random.default_rng(16)
    stack = rng.integers(0, 65536, (3, 8, 8), dtype=np.uint16)
    stack[0, 0, 0], stack[0, 0, 1], stack[0, 0, 2] = 0, 255, 65535  # 255 >> 8 is 0, not a rounded 1
    for i, pixels in enumerate(stack):
        write_png(tmp_path / "em" / f"s{i}.png", pixels)
    assert io.png_header(tmp_path / "em" / "s0.png")[2] == 16
    result, out = convert(tmp_path, tmp_path / "em", "--params", json.dumps({"convert": {"intensity": "shift"}}))
    assert result.returncode == 0, result.stderr
    image, _ = io.read_volume(out / "image.h5")
    assert image.dtype == np.uint8
    assert np.array_equal(image, (stack >> 8).astype(np.uint8))
    assert image[0, 0, :3].tolist() == [0, 0, 255]


# ---- HDF5 files between stages ---------------------------------------------------------------


def _truncated_hdf5(tmp_path):
    heat = heat_block(tmp_path / "heat.h5", np.full((1, 12, 64, 64), 9, np.uint8))
    data = heat.read_bytes()
    heat.write_bytes(data[: len(data) // 2])
    return heat


def _garbage_named_h5(tmp_path):
    heat = tmp_path / "heat.h5"
    heat.write_text("this is not HDF5\n")
    return heat


def _hdf5_without_main(tmp_path):
    heat = tmp_path / "heat.h5"
    with h5py.File(heat, "w") as f:
        f["raw"] = np.zeros((1, 4, 8, 8), np.uint8)
    return heat


def _image_volume_as_heatmap(tmp_path):
    """An image volume (z, y, x) given where a heatmap is expected."""
    heat_attrs = contract.heat_file_attrs(["foreground"], HEAT_DEPTH, 1)
    return contract.fixture(tmp_path / "image.h5", "image", np.zeros((12, 16, 16)), attrs=heat_attrs)


@pytest.mark.parametrize(
    "make, words",
    [
        (_truncated_hdf5, ["{path}: not a readable HDF5 file", "corrupt or truncated; delete it and rerun"]),
        (_garbage_named_h5, ["{path}: not a readable HDF5 file"]),
        (_hdf5_without_main, ["no 'main' dataset (found raw)", "rewrite the file with that name"]),
        (_image_volume_as_heatmap, ["{path}: heatmap has shape", "not (channel, z, y, x)"]),
    ],
    ids=["truncated-hdf5", "garbage-named-h5", "hdf5-without-main", "image-volume-given-where-a-heatmap-is-expected"],
)
def test_bad_heat_file_is_refused_in_one_line(tmp_path, make, words):
    path = make(tmp_path)
    result = emmito("segment", path, tmp_path / "out" / "seg.h5")
    assert_refused(result, "segment", [word.format(path=path) for word in words], tmp_path / "out")


def test_merge_with_a_missing_chunk_names_it(tmp_path):
    chunk0 = heat_block(tmp_path / "chunk_0.h5", np.zeros((1, 4, 8, 8), np.uint8), 0)
    heat_block(tmp_path / "chunk_2.h5", np.zeros((1, 4, 8, 8), np.uint8), 8)
    params = json.dumps({"infer": {"chunk_slices": 4}, "merge": {"block_slices": 8, "block_overlap": 2}})
    result = emmito("merge", tmp_path / "out" / "block_0.h5", chunk0, tmp_path / "chunk_2.h5", "--block", "0", "--params", params)
    assert_refused(result, "merge", ["slices [4, 8) of block [0, 10) are missing", "pass chunk_1.h5 too"], tmp_path / "out")


def test_trace_with_a_missing_block_names_it(tmp_path):
    contract.fixture(tmp_path / "block_0.h5", "seg", np.zeros((10, 8, 8)), volume_depth=20)
    params = json.dumps({"merge": {"block_slices": 8, "block_overlap": 2}})
    out = tmp_path / "out"
    result = emmito("trace", out / "seg_infer.h5", out / "trace.json", tmp_path / "block_0.h5", "--params", params)
    assert_refused(result, "trace", ["block(s) 1, 2 of 3 missing", "seg/block_1.h5", "pass all blocks"], out)


def test_output_folder_blocked_by_a_file(tmp_path):
    heat = heat_block(tmp_path / "heat.h5", np.zeros((1, 12, 16, 16), np.uint8))
    (tmp_path / "out").write_text("a file where the results folder should be")
    result = emmito("segment", heat, tmp_path / "out" / "seg" / "block_0.h5")
    assert result.returncode == 2
    line = error_line(result.stderr, "segment")
    assert f"{tmp_path / 'out' / 'seg'}: cannot create this output folder" in line and "fix the output path" in line
    assert (tmp_path / "out").read_text().startswith("a file")


# ---- --params and config ---------------------------------------------------------------


@pytest.mark.parametrize(
    "params, words",
    [
        ("{segment: 1}", ["--params is not valid JSON", "pass an object such as"]),
        ("[1, 2]", ["--params must be a JSON object of config sections"]),
        ('{"segment": {"min_sise": 5}}', ["--params: unknown key 'min_sise' in 'segment': check the spelling", "allowed keys:"]),
    ],
    ids=["not-json", "json-but-not-an-object", "typo-in-a-key"],
)
def test_bad_params_are_refused_in_one_line(tmp_path, params, words):
    result = emmito("segment", "heat.h5", tmp_path / "out" / "seg.h5", "--params", params)
    assert_refused(result, "segment", words, tmp_path / "out")


def minimal_config(**sections) -> dict:
    return {"volumes": {"v": {"images": "em/"}}, **sections}


@pytest.mark.parametrize(
    "sections, words",
    [
        ({"segment": {"min_sise": 5}}, ["unknown key 'min_sise' in 'segment': check the spelling"]),
        ({"chunk_slices": 20}, ["unknown key 'chunk_slices' in the top level"]),
        ({"segment": {"seed_threshold": "high"}}, ["key 'segment.seed_threshold' is 'high', not of type number: fix its value"]),
        ({"trace": {"threshold": 1.5}}, ["key 'trace.threshold' is 1.5, out of range: it must be <= 1"]),
        ({"segment": {"foreground_threshold": -3}}, ["key 'segment.foreground_threshold' is -3, out of range: it must be >= 0"]),
        ({"infer": {"chunk_slices": 20}, "merge": {"block_slices": 50}},
         ["merge.block_slices (50) is not a multiple of infer.chunk_slices (20)", "e.g. block_slices: 40"]),
        ({"volumes": {"v": {"images": "em/", "label_format": "png"}}}, ["key 'volumes.v.label_format' is 'png': use one of 'binary'"]),
    ],
    ids=["unknown-key", "key-at-wrong-level", "wrong-type", "threshold-above-range", "threshold-below-range",
         "block-not-multiple-of-chunk", "unknown-label-format"],
)
def test_config_mistakes_are_one_line_naming_the_key(tmp_path, sections, words):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(merged(minimal_config(), sections)))
    with pytest.raises(EmmitoError) as info:
        cfg.load(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, message


def test_config_file_given_to_a_verb_is_checked(tmp_path, capfd):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(minimal_config(trace={"threshold": 1.5})))
    status, err = run_main(["trace", tmp_path / "out" / "s.h5", tmp_path / "out" / "t.json", "b.h5", "--config", path], capfd)
    assert status == 2
    assert f"{path}: key 'trace.threshold' is 1.5, out of range" in error_line(err, "trace")
    assert files_under(tmp_path / "out") == []


def test_yaml_syntax_error_names_the_line(tmp_path, capfd):
    path = tmp_path / "my.yaml"
    path.write_text("volumes:\n  v: {images: em/}\nsegment:\n  min_size: [500\n")
    status, err = run_main(["segment", "heat.h5", tmp_path / "out" / "seg.h5", "--config", path], capfd)
    assert status == 2
    line = error_line(err, "segment")
    assert f"{path}: line 5 not valid YAML" in line and "fix the syntax" in line


def _project(dest: Path, overrides: dict, images_from: Path | None = None) -> Path:
    """The workflow files plus a config; no synthetic data (config errors stop before it is read)."""
    dest.mkdir(parents=True)
    shutil.copy2(REPO / "Snakefile", dest / "Snakefile")
    shutil.copytree(REPO / "rules", dest / "rules")
    config = merged(TINY_CONFIG, overrides)
    config["volumes"]["deploy"] = {"images": "em/deploy"}
    config["volumes"]["train"] = {"images": "em/train", "labels": "em/labels", "label_format": "binary"}
    if images_from is not None:
        for name in ("deploy", "train"):
            shutil.copytree(images_from, dest / "em" / name)
        mask_stack(dest / "em" / "labels", count=len(list(images_from.glob("*.png"))))
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def _snakemake_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    return output


@pytest.mark.workflow
def test_snakemake_dry_run_refuses_a_block_size_that_is_not_a_multiple(tmp_path):
    project = _project(tmp_path / "p", {"infer": {"chunk_slices": 4}, "merge": {"block_slices": 10}})
    output = _snakemake_error(snakemake(project, "-n", check=False))
    assert "config: merge.block_slices (10) is not a multiple of infer.chunk_slices (4)" in output
    assert not (project / "results").exists()


@pytest.mark.workflow
def test_snakemake_dry_run_names_the_volume_with_a_missing_slice(tmp_path):
    images = grey_stack(tmp_path / "em", count=6)
    (images / "slice_004.png").unlink()
    project = _project(tmp_path / "p", {}, images_from=images)
    output = _snakemake_error(snakemake(project, "-n", check=False))
    assert "InputFunctionException" not in output, output
    # the first volume listed is the one named
    assert re.search(r"volumes\.(deploy|train)\.images: folder em/\w+: slice number 4 is missing between slice_003.png and slice_005.png", output), output
    assert not (project / "results").exists()


@pytest.mark.workflow
def test_snakemake_dry_run_names_the_volume_with_a_missing_hdf5_dataset(tmp_path):
    project = _project(tmp_path / "p", {}, images_from=grey_stack(tmp_path / "em", count=6))
    formats.hdf5(project / "em" / "stack.h5", "volumes/raw", np.zeros((6, 16, 16), np.uint8))
    config = yaml.safe_load((project / "config.yaml").read_text())
    config["volumes"]["deploy"] = {"images": "em/stack.h5:/volumes/row"}
    (project / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    output = _snakemake_error(snakemake(project, "-n", check=False))
    assert "InputFunctionException" not in output, output
    assert "volumes.deploy.images: em/stack.h5: no dataset /volumes/row in it (it holds /volumes/raw)" in output, output
    assert not (project / "results").exists()


# ---- checkpoints ---------------------------------------------------------------------------


TINY_MODEL = {"filters": [4, 8], "patch": [4, 16, 16], "conv3d_from_level": 1, "pool_z_from_level": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A real one-iteration checkpoint of TINY_MODEL and a 12-slice image.h5."""
    from emmito.contract import save_checkpoint
    from emmito.train import train_model

    folder = tmp_path_factory.mktemp("ckpt")
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (12, 32, 32), dtype=np.uint8)
    label = np.zeros((12, 32, 32), np.uint32)
    label[2:9, 5:15, 5:15] = 1
    params = cfg.validate(minimal_config(model=dict(TINY_MODEL), train={"iterations": 1, "batch_size": 1, "warmup_iterations": 0}))
    params["train"]["threads"] = 1
    checkpoint, _ = train_model([(image, label)], [], params)
    save_checkpoint(folder / "checkpoint.pt", checkpoint)
    contract.fixture(folder / "image.h5", "image", image)
    return {"checkpoint": folder / "checkpoint.pt", "image": folder / "image.h5"}


def _infer(trained: dict[str, Path], out: Path, chunk: int, model: dict, capfd, checkpoint: Path | None = None) -> tuple[int, str]:
    params = json.dumps({"model": model, "infer": {"chunk_slices": 4, "threads": 1}})
    return run_main(["infer", trained["image"], checkpoint or trained["checkpoint"], out, "--chunk", str(chunk), "--params", params], capfd)


def test_checkpoint_from_a_different_model_config(tmp_path, trained, capfd):
    status, err = _infer(trained, tmp_path / "out" / "chunk_0.h5", 0, {**TINY_MODEL, "filters": [8, 16]}, capfd)
    assert status == 2
    line = error_line(err, "infer")
    assert f"{trained['checkpoint']} was trained with model.filters=[4,8], the config says [8,16]: retrain or fix the config" in line
    assert files_under(tmp_path / "out") == []


def test_truncated_checkpoint(tmp_path, trained, capfd):
    broken = tmp_path / "checkpoint.pt"
    broken.write_bytes(trained["checkpoint"].read_bytes()[:300])
    status, err = _infer(trained, tmp_path / "out" / "chunk_0.h5", 0, TINY_MODEL, capfd, checkpoint=broken)
    assert status == 2
    line = error_line(err, "infer")
    assert f"{broken}: not a readable checkpoint" in line and "delete it and retrain" in line
    assert files_under(tmp_path / "out") == []


def test_chunk_index_out_of_range(tmp_path, trained, capfd):
    status, err = _infer(trained, tmp_path / "out" / "chunk_7.h5", 7, TINY_MODEL, capfd)
    assert status == 2
    assert "chunk 7 is outside a volume of 12 slices (3 chunks of 4): pick 0..2" in error_line(err, "infer")
    assert files_under(tmp_path / "out") == []


# ---- a volume with no mitochondria: a valid, empty result ----------------------------------------


def test_volume_without_mitochondria_gives_an_empty_result(tmp_path, capfd):
    """Zero heat through segment, trace, upsample and evaluate: exit 0, empty ids, defined metrics."""
    params = json.dumps({"merge": {"block_slices": 8, "block_overlap": 2}})
    blocks = []
    for b, (start, stop) in enumerate([(0, 10), (8, 12)]):
        heat = heat_block(tmp_path / f"heat_{b}.h5", np.zeros((1, stop - start, 16, 16), np.uint8), start)
        blocks.append(tmp_path / f"seg_{b}.h5")
        assert run_main(["segment", heat, blocks[-1]], capfd)[0] == 0
    contract.fixture(tmp_path / "image.h5", "image", np.zeros((12, 16, 16)))
    contract.fixture(tmp_path / "label.h5", "label", np.zeros((12, 16, 16)))
    steps = [
        ["trace", tmp_path / "seg_infer.h5", tmp_path / "trace.json", *blocks, "--params", params],
        ["upsample", tmp_path / "seg_infer.h5", tmp_path / "image.h5", tmp_path / "seg.h5"],
        ["evaluate", tmp_path / "seg.h5", tmp_path / "label.h5", tmp_path / "metrics.json"],
    ]
    for argv in steps:
        status, err = run_main(argv, capfd)
        assert status == 0, err
    seg, _ = io.read_volume(tmp_path / "seg.h5")
    assert seg.shape == (12, 16, 16) and seg.dtype == np.uint32 and not seg.any()
    assert json.loads((tmp_path / "trace.json").read_text())["objects"] == {}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["predicted_objects"] == 0 and metrics["gt_objects"] == 0
    # nothing to find and nothing found: every score is defined (no NaN in the JSON)
    assert metrics["instance_f1"] == 1.0 and metrics["voxel_iou"] == 1.0


# ---- disk full, simulated -------------------------------------------------------------------


def _full_disk_at(temporary: Path) -> None:
    """Make the next write of this process to ``temporary`` hit ENOSPC: /dev/full under its name."""
    temporary.parent.mkdir(parents=True, exist_ok=True)
    temporary.symlink_to("/dev/full")


def test_disk_full_while_hdf5_writes(tmp_path, capfd):
    """HDF5 itself gets ENOSPC (its OSError carries errno only in its message)."""
    heat = heat_block(tmp_path / "heat.h5", np.zeros((1, 12, 16, 16), np.uint8))
    out = tmp_path / "out" / "seg.h5"
    _full_disk_at(out.with_name(f".seg.h5.tmp-{os.getpid()}"))
    status, err = run_main(["segment", heat, out], capfd)
    assert status == 2
    assert error_line(err, "segment") == (
        f"emmito segment: error: {out}: no space left on the device while writing it: free space or point results to a larger disk"
    )
    assert files_under(tmp_path / "out") == []


def test_disk_full_while_json_writes(tmp_path, capfd):
    contract.fixture(tmp_path / "seg.h5", "label", np.zeros((4, 8, 8)))  # read as both segmentation and labels
    out = tmp_path / "out" / "metrics.json"
    _full_disk_at(out.with_name(f".metrics.json.tmp-{os.getpid()}"))
    status, err = run_main(["evaluate", tmp_path / "seg.h5", tmp_path / "seg.h5", out], capfd)
    assert status == 2
    assert f"{out}: no space left on the device" in error_line(err, "evaluate")
    assert files_under(tmp_path / "out") == []


@pytest.mark.parametrize(
    "code, words",
    [(errno.ENOSPC, "no space left on the device"), (errno.EDQUOT, "disk quota exceeded"), (errno.EACCES, "check the folder's permissions")],
    ids=["ENOSPC", "EDQUOT", "EACCES"],
)
def test_write_failing_at_the_rename(tmp_path, capfd, monkeypatch, code, words):
    """os.replace fails (as on a full or read-only network file system): one line, no temporary file."""
    heat = heat_block(tmp_path / "heat.h5", np.zeros((1, 12, 16, 16), np.uint8))

    def failing_replace(src, dst):
        raise OSError(code, os.strerror(code), str(src))

    monkeypatch.setattr(os, "replace", failing_replace)
    status, err = run_main(["segment", heat, tmp_path / "out" / "seg.h5"], capfd)
    assert status == 2
    line = error_line(err, "segment")
    assert f"{tmp_path / 'out' / 'seg.h5'}: " in line and words in line
    assert files_under(tmp_path / "out") == []
