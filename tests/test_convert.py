"""emmito convert and PNG reading: PNG slices in, image.h5 / label.h5 out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cc3d
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from emmito import contract, convert
from emmito.convert import binary_to_instances, convert_stack, label_components
from emmito.io import EmmitoError, list_slices, png_header, read_png_slice, read_volume
from emmito.sources import IntensityMapping

CDEEP3M = Path(
    os.environ.get("EMMITO_CDEEP3M", Path(__file__).resolve().parents[2] / "shared" / "data" / "cdeep3m-mito")
)


def save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def grey(path: Path, pixels: np.ndarray) -> Path:
    return save(path, Image.fromarray(pixels))


def palette_png(path: Path, indices: np.ndarray, colours: list[tuple[int, int, int]]) -> Path:
    image = Image.fromarray(indices.astype(np.uint8), mode="P")
    image.putpalette([c for colour in colours for c in colour])
    return save(path, image)


def stack(folder: Path, volume: np.ndarray, name: str = "slice_{:03d}.png") -> list[Path]:
    return [grey(folder / name.format(z), volume[z]) for z in range(len(volume))]


def blobs(shape: tuple[int, int, int], seed: int, level: float = 0.6) -> np.ndarray:
    """Random binary blobs (z, y, x), some spanning many slices, some touching only diagonally."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0.8, 1.5, 1.5))
    return field > level * field.std()


# ---- list_slices ---------------------------------------------------------------------


def test_slices_ordered_by_the_number_in_their_names(tmp_path):
    for name in ("s10.png", "s2.png", "s3.png", "s4.png", "s5.png", "s6.png", "s7.png", "s8.png", "s9.png", "s1.png"):
        grey(tmp_path / name, np.zeros((4, 4), np.uint8))
    (tmp_path / "notes.txt").write_text("not a slice")
    (tmp_path / ".s11.png.tmp-1").write_text("a temporary file")
    names = [p.name for p in list_slices(tmp_path)]
    assert names == [f"s{i}.png" for i in range(1, 11)]
    assert [p.name for p in list_slices(str(tmp_path / "s*.png"))] == names


def test_last_run_of_digits_counts(tmp_path):
    for z in (81, 82, 83):
        grey(tmp_path / f"mitos_3D.{z:03d}.png", np.zeros((4, 4), np.uint8))
    assert [p.name for p in list_slices(tmp_path)] == ["mitos_3D.081.png", "mitos_3D.082.png", "mitos_3D.083.png"]


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "names, pattern, match",
    [
        (
            ["slice_0000.png", "slice_0001.png", "slice_0002.png", "slice_0004.png", "slice_0005.png"],
            "",
            r"slice number 3 is missing between slice_0002.png and slice_0004.png",
        ),
        (["s01.png", "s1.png"], "", r"s01.png and s1.png both have slice number 1"),
        (["s1.png", "overview.png"], "", "overview.png has no number"),
        (["s1.png", "overview.png"], "missing/*.png", "no .png or .tif files match"),
        (["empty/"], "empty", "no .png or .tif files in it"),
    ],
    ids=["gap-names-the-neighbours", "duplicate-names-both", "name-without-number", "glob-matching-nothing", "empty-folder"],
)
def test_bad_slice_names_refused(tmp_path, names, pattern, match):
    """``names`` are made in tmp_path (a trailing / makes a folder), then ``pattern`` under it is listed."""
    for name in names:
        if name.endswith("/"):
            (tmp_path / name).mkdir()
        else:
            grey(tmp_path / name, np.zeros((4, 4), np.uint8))
    where = tmp_path / pattern if pattern else tmp_path
    with pytest.raises(EmmitoError, match=match):
        list_slices(str(where) if "*" in pattern else where)


# ---- read_png_slice ---------------------------------------------------------------------


def _palette_inverted_grey(tmp_path):
    indices = np.array([[0, 1], [2, 3]], np.uint8)
    return palette_png(tmp_path / "i.png", indices, [(255 - i, 255 - i, 255 - i) for i in range(256)])


def _palette_red_mask(tmp_path):
    """A mask whose index 1 is drawn red: read by index, it is 1, not a colour."""
    return palette_png(tmp_path / "m.png", np.array([[0, 1], [0, 1]], np.uint8), [(0, 0, 0), (255, 0, 0)])


def _palette_ids(tmp_path):
    return palette_png(tmp_path / "ids.png", np.array([[0, 1], [2, 3]], np.uint8), [(9, 9, 9)] * 4)


GREY_VALUES = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
BINARY_PATTERN = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)


def _rgb_equal_channels(tmp_path):
    return save(tmp_path / "rgb.png", Image.fromarray(np.repeat(GREY_VALUES[..., None], 3, axis=-1), "RGB"))


def _rgba_equal_channels(tmp_path):
    rgba = np.concatenate([np.repeat(GREY_VALUES[..., None], 3, axis=-1), np.full((3, 4, 1), 7, np.uint8)], axis=-1)
    return save(tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA"))


def _vast_rgb(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1] = (1, 2, 3)
    rgb[1, 0] = (0, 1, 0)
    rgb[1, 1] = (255, 255, 255)
    return save(tmp_path / "v.png", Image.fromarray(rgb, "RGB"))


@pytest.mark.parametrize(
    "make, kind, dtype, expected",
    [
        # palette PNGs: images get the palette applied, labels are read by index
        (_palette_inverted_grey, "image", np.uint8, [[255, 254], [253, 252]]),
        (_palette_red_mask, "label_binary", np.uint8, [[0, 1], [0, 1]]),
        (_palette_ids, "label_instance", np.uint32, [[0, 1], [2, 3]]),
        # RGB and RGBA with equal channels give that channel
        (_rgb_equal_channels, "image", np.uint8, GREY_VALUES.tolist()),
        (_rgba_equal_channels, "image", np.uint8, GREY_VALUES.tolist()),
        # binary masks: 0/1, 0/255 and 1-bit
        (lambda tmp_path: grey(tmp_path / "a.png", BINARY_PATTERN), "label_binary", np.uint8, BINARY_PATTERN.tolist()),
        (lambda tmp_path: grey(tmp_path / "b.png", BINARY_PATTERN * 255), "label_binary", np.uint8, BINARY_PATTERN.tolist()),
        (
            lambda tmp_path: save(tmp_path / "c.png", Image.fromarray(BINARY_PATTERN.astype(bool))),
            "label_binary", np.uint8, BINARY_PATTERN.tolist(),
        ),
        # VAST: id = R*65536 + G*256 + B
        (_vast_rgb, "label_vast", np.uint32, [[0, 66051], [256, 2**24 - 1]]),
    ],
    ids=[
        "palette-image", "palette-mask-by-index", "palette-ids-by-index", "rgb-equal-channels", "rgba-equal-channels",
        "binary-0-1", "binary-0-255", "binary-1-bit", "vast-rgb",
    ],
)
def test_png_slices_read_as_their_kind(tmp_path, make, kind, dtype, expected):
    pixels = read_png_slice(make(tmp_path), kind)
    assert pixels.dtype == dtype and pixels.tolist() == expected


def test_16_bit_grey_scaled_by_shifting(tmp_path):
    values = np.array([[0, 0x00FF, 0x0100], [0x1234, 0xFF00, 0xFFFF]], np.uint16)
    path = grey(tmp_path / "deep.png", values)
    assert png_header(path)[2] == 16
    image = read_png_slice(path, "image")
    assert image.dtype == np.uint8 and image.tolist() == [[0, 0, 1], [0x12, 0xFF, 0xFF]]
    assert read_png_slice(path, "label_instance").tolist() == values.astype(np.uint32).tolist()


def _rgb_colour(tmp_path):
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[1, 2] = (10, 20, 30)
    return save(tmp_path / "colour.png", Image.fromarray(rgb, "RGB"))


def _cut_png(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    full = grey(tmp_path / "full.png", noise).read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    return tmp_path / "cut.png"


def _jpeg_named_png(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "jpeg.png", format="JPEG")
    return tmp_path / "jpeg.png"


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "make, kind, match",
    [
        (
            lambda tmp_path: palette_png(tmp_path / "c.png", np.array([[0, 1]], np.uint8), [(0, 0, 0), (200, 10, 10)]),
            "image", "colour",
        ),
        (_rgb_colour, "image", r"colour.png: is colour \(channels differ\): export it as greyscale"),
        (
            lambda tmp_path: grey(tmp_path / "aa.png", np.array([[0, 255, 128], [3, 255, 0]], np.uint8)),
            "label_binary", r"aa.png: binary mask .* other than 0/1/255: 3, 128",
        ),
        (lambda tmp_path: grey(tmp_path / "g.png", np.zeros((2, 2), np.uint8)), "label_vast", "use label_format instance"),
        (_vast_rgb, "label_instance", "use label_format vast"),
        (_cut_png, "image", r"cut.png: not a readable PNG .*: re-export it"),
        (_jpeg_named_png, "image", r"jpeg.png: not a readable PNG"),
    ],
    ids=[
        "palette-with-colours-as-image", "rgb-colour-as-image", "binary-mask-with-stray-values", "grey-as-vast",
        "rgb-as-instance", "truncated-png", "jpeg-named-png",
    ],
)
def test_png_slices_not_fitting_their_kind_refused(tmp_path, make, kind, match):
    with pytest.raises(EmmitoError, match=match):
        read_png_slice(make(tmp_path), kind)


# ---- connected components -----------------------------------------------------------------


@pytest.mark.parametrize("connectivity", [6, 26])
def test_slabwise_components_equal_cc3d_of_the_whole(connectivity):
    mask = blobs((17, 40, 40), seed=connectivity)
    whole = cc3d.connected_components(mask, connectivity=connectivity)
    assert whole.max() > 20  # enough objects that some cross slab faces
    for slab_slices in (1, 2, 5, 17):
        ids = binary_to_instances(mask, slab_slices, connectivity)
        assert ids.dtype == np.uint32
        # Up to a relabeling: a one-to-one map between the two id sets...
        pairs = np.unique(np.stack([ids.ravel(), whole.ravel()]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
        # ... and in fact the same numbering (raster order of first voxel).
        assert np.array_equal(ids, whole)


def test_components_join_across_many_slab_faces():
    # One diagonal staircase: each step touches the next only at a corner across z.
    mask = np.zeros((6, 8, 8), bool)
    for z in range(6):
        mask[z, z, z] = True
    assert binary_to_instances(mask, 1, 26).max() == 1
    assert binary_to_instances(mask, 1, 6).max() == 6
    empty = np.zeros((3, 4, 4), np.uint32)
    assert label_components(empty, 2) == 0 and not empty.any()


# ---- convert_stack / CLI -----------------------------------------------------------------


def test_binary_label_stack_becomes_cc_instances_on_disk(tmp_path, monkeypatch):
    mask = blobs((12, 24, 32), seed=3)
    images = stack(tmp_path / "images", (mask * 90 + 40).astype(np.uint8))
    labels = stack(tmp_path / "labels", mask.astype(np.uint8) * 255, "mask.{:03d}.png")
    # Force several slabs (of 2 slices each) through the HDF5 path.
    monkeypatch.setattr(convert, "SLAB_VOXELS", 2 * 24 * 32)
    summary = convert_stack(
        images,
        voxel_size=(40, 6, 6),
        image_out=tmp_path / "image.h5",
        label_paths=labels,
        label_format="binary",
        label_out=tmp_path / "label.h5",
    )
    ids, attrs = read_volume(tmp_path / "label.h5")
    image, _ = read_volume(tmp_path / "image.h5")
    expected = cc3d.connected_components(mask, connectivity=convert.LABEL_CONNECTIVITY)
    assert ids.dtype == np.uint32 and np.array_equal(ids, expected)
    assert summary["objects"] == expected.max()
    assert image.dtype == np.uint8 and np.array_equal(image, (mask * 90 + 40).astype(np.uint8))
    assert attrs[contract.VOXEL_SIZE] == [40.0, 6.0, 6.0] and attrs[contract.OFFSET] == 0


def test_instance_ids_kept_as_they_are(tmp_path):
    ids = np.zeros((3, 8, 8), np.uint16)
    ids[:, 1:3, 1:3] = 7
    ids[1, 5:7, 5:7] = 40000
    images = stack(tmp_path / "images", np.zeros((3, 8, 8), np.uint8))
    labels = stack(tmp_path / "labels", ids)
    convert_stack(
        images, voxel_size=(40, 8, 8), label_paths=labels, label_format="instance", label_out=tmp_path / "l.h5"
    )
    assert np.array_equal(read_volume(tmp_path / "l.h5")[0], ids.astype(np.uint32))
    assert not (tmp_path / "image.h5").exists()


def _mixed_image_sizes(tmp_path):
    images = stack(tmp_path / "images", np.zeros((3, 8, 10), np.uint8))
    grey(images[1], np.zeros((8, 9), np.uint8))
    return {"image_paths": images, "voxel_size": (40, 8, 8), "image_out": tmp_path / "image.h5"}


def _too_few_labels(tmp_path):
    images = stack(tmp_path / "images", np.zeros((3, 8, 8), np.uint8))
    too_few = stack(tmp_path / "few", np.zeros((2, 8, 8), np.uint8))
    return {"image_paths": images, "voxel_size": (1, 1, 1), "label_paths": too_few, "label_out": tmp_path / "l.h5"}


def _labels_of_another_size(tmp_path):
    images = stack(tmp_path / "images", np.zeros((3, 8, 8), np.uint8))
    wrong_size = stack(tmp_path / "wide", np.zeros((3, 8, 9), np.uint8))
    return {"image_paths": images, "voxel_size": (1, 1, 1), "label_paths": wrong_size, "label_out": tmp_path / "l.h5"}


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "make, match",
    [
        (_mixed_image_sizes, r"image slice 001 \(.*slice_001.png\) is 9x8 \(width x height\), the others are 10x8: crop or pad it"),
        (_too_few_labels, r"2 label slices .* but 3 image slices"),
        (_labels_of_another_size, r"label slices .* are 9x8 but image slices .* are 8x8"),
    ],
    ids=["mixed-slice-sizes", "label-count-not-matching-images", "label-size-not-matching-images"],
)
def test_slices_that_do_not_fit_together_refused(tmp_path, make, match):
    """Checked from the PNG headers, before anything is written."""
    arguments = make(tmp_path)
    with pytest.raises(EmmitoError, match=match):
        convert_stack(arguments.pop("image_paths"), **arguments)
    assert not (tmp_path / "image.h5").exists() and not (tmp_path / "l.h5").exists()


@pytest.mark.bad_input
def test_no_partial_output_when_the_labels_fail(tmp_path):
    images = stack(tmp_path / "images", np.full((4, 8, 8), 100, np.uint8))
    masks = np.zeros((4, 8, 8), np.uint8)
    masks[3, 2, 2] = 17  # a stray value in the last slice, found only while decoding
    labels = stack(tmp_path / "labels", masks)
    out = tmp_path / "out"
    with pytest.raises(EmmitoError, match="17"):
        convert_stack(
            images,
            voxel_size=(40, 8, 8),
            image_out=out / "image.h5",
            label_paths=labels,
            label_format="binary",
            label_out=out / "label.h5",
        )
    assert list(out.iterdir()) == []  # neither file, nor a temporary one


def run_convert(*args: str) -> subprocess.CompletedProcess:
    """``emmito convert ARGS`` in a subprocess, as the workflow runs it."""
    emmito = str(Path(sys.executable).parent / "emmito")
    return subprocess.run([emmito, "convert", *args], capture_output=True, text=True, timeout=60)


def test_cli_converts_and_reports_mistakes_in_one_line(tmp_path):
    images = stack(tmp_path / "images", np.full((2, 6, 6), 50, np.uint8))
    ok = run_convert("--images", str(tmp_path / "images"), "--voxel-size", "30", "5", "5", "--image-out", str(tmp_path / "image.h5"))
    assert ok.returncode == 0, ok.stderr
    image, attrs = read_volume(tmp_path / "image.h5")
    assert image.shape == (2, 6, 6) and attrs[contract.VOXEL_SIZE] == [30.0, 5.0, 5.0]
    # Labels alone, as the workflow's convert_labels rule runs it.
    masks = np.zeros((2, 6, 6), np.uint8)
    masks[:, 1:3, 1:3] = 255
    masks[1, 4, 4] = 255
    stack(tmp_path / "labels", masks)
    labels_only = run_convert(
        "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
        "--label-format", "binary", "--label-out", str(tmp_path / "label.h5"),
    )
    assert labels_only.returncode == 0, labels_only.stderr
    ids, _ = read_volume(tmp_path / "label.h5")
    assert ids.dtype == np.uint32 and ids.max() == 2 and ids[1, 4, 4] == 2 and ids[0, 1, 1] == ids[1, 2, 2] == 1
    images[1].write_bytes(b"not a png at all")
    bad = run_convert("--images", str(tmp_path / "images"), "--image-out", str(tmp_path / "again.h5"))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("emmito convert: error: ")
    assert "slice_001.png: not a readable PNG" in bad.stderr
    assert not (tmp_path / "again.h5").exists()


# ---- real data ------------------------------------------------------------------------


@pytest.mark.realdata
def test_cdeep3m_slices_read_as_grey_images_and_0_1_masks():
    if not CDEEP3M.is_dir():
        pytest.skip(f"{CDEEP3M} is absent (set EMMITO_CDEEP3M to the cdeep3m-mito folder)")
    for version in ("v2018", "v2020"):
        images = list_slices(CDEEP3M / version / "training" / "images")
        labels = list_slices(CDEEP3M / version / "training" / "labels")
        assert len(images) == len(labels) == 20
        image = read_png_slice(images[0], "image")  # v2020: palette PNG
        mask = read_png_slice(labels[0], "label_binary")  # v2018: palette {0,1}; v2020: grey {0,255}
        assert image.shape == mask.shape == (1024, 1024)
        assert image.dtype == np.uint8 and 80 < image.mean() < 180 and image.std() > 20
        assert set(np.unique(mask).tolist()) == {0, 1}
        assert 0.03 < mask.mean() < 0.2  # the README: about 8 %
        # Mitochondria are darker than the rest of the tissue.
        assert image[mask == 1].mean() < image[mask == 0].mean() - 10


# ---- every input format, and one intensity mapping per volume --------------------------------


def twelve_bit_volume(depth: int = 9, size: int = 24) -> np.ndarray:
    """A 12-bit detector's image in uint16 (values 200..3900), one slice much dimmer than the rest."""
    rng = np.random.default_rng(12)
    volume = rng.integers(200, 3901, (depth, size, size), dtype=np.uint16)
    volume[4] = rng.integers(1800, 2201, (size, size), dtype=np.uint16)  # a dim slice: not stretched on its own
    volume[:, 0, 0] = 2000  # the same value in every slice
    return volume


def test_12_bit_tiff_slices_keep_their_contrast_through_one_mapping(tmp_path):
    from formats import tiff_slices

    raw = twelve_bit_volume()
    summary = convert_stack(tiff_slices(tmp_path / "em", raw), voxel_size=(40, 8, 8), image_out=tmp_path / "image.h5")
    image, attrs = read_volume(tmp_path / "image.h5")
    assert image.dtype == np.uint8 and len(np.unique(image)) >= 200  # `>> 8` would leave 16 levels
    assert len(np.unique((raw >> 8).astype(np.uint8))) <= 16
    mapping = IntensityMapping.from_json(attrs[contract.INTENSITY_MAPPING])
    assert mapping == summary["intensity_mapping"]
    assert mapping.rule == "percentile" and mapping.source_dtype == "uint16" and mapping.percentiles == (0.1, 99.9)
    assert 200 <= mapping.low < 300 and 3800 < mapping.high <= 3900
    # One mapping for every slice: each slice, mapped alone, is what the volume holds...
    for z in range(len(raw)):
        assert np.array_equal(mapping.apply(raw[z]), image[z])
    # ... so a value maps alike everywhere, and the dim slice stays dim (no per-slice stretch).
    assert len(set(image[:, 0, 0].tolist())) == 1
    assert image[4].max() - image[4].min() < 40 < image[3].max() - image[3].min()


def test_every_format_converts_to_the_same_image_h5(tmp_path):
    from formats import hdf5, n5, png_slices, tiff_slices, tiff_stack, zarr_array

    volume = np.random.default_rng(8).integers(0, 256, (10, 16, 24), dtype=np.uint8)
    specs = {
        "png": png_slices(tmp_path / "png", volume),
        "tif": tiff_slices(tmp_path / "tif", volume),
        "stack": tiff_stack(tmp_path / "stack.tif", volume),
        "h5": hdf5(tmp_path / "v.h5", "em", volume, chunks=(3, 16, 24)),
        "zarr": zarr_array(tmp_path / "v.zarr", "em", volume, chunks=(5, 8, 8)),
        "n5": n5(tmp_path / "v.n5", "em", volume),
    }
    for name, spec in specs.items():
        convert_stack(spec, voxel_size=(40, 8, 8), image_out=tmp_path / f"{name}.h5")
        image, attrs = read_volume(tmp_path / f"{name}.h5")
        assert np.array_equal(image, volume), name
        assert json.loads(attrs[contract.INTENSITY_MAPPING]) == {"rule": "identity", "source_dtype": "uint8"}
    first = (tmp_path / "png.h5").read_bytes()
    assert all((tmp_path / f"{name}.h5").read_bytes() == first for name in specs), "same pixels, same bytes"


def test_labels_from_arrays_and_stacks(tmp_path):
    from formats import hdf5, tiff_stack, zarr_array

    mask = blobs((8, 20, 20), seed=5)
    images = tiff_stack(tmp_path / "em.tif", (mask * 100 + 50).astype(np.uint8))
    convert_stack(images, voxel_size=(40, 8, 8), label_paths=zarr_array(tmp_path / "m.zarr", "mask", mask.astype(np.uint8) * 255),
                  label_format="binary", label_out=tmp_path / "binary.h5")
    assert np.array_equal(read_volume(tmp_path / "binary.h5")[0], cc3d.connected_components(mask, connectivity=6))
    ids = (np.arange(8 * 20 * 20, dtype=np.int64).reshape(8, 20, 20) % 7) * 1000
    convert_stack(images, voxel_size=(40, 8, 8), label_paths=hdf5(tmp_path / "ids.h5", "seg/ids", ids),
                  label_format="instance", label_out=tmp_path / "instance.h5")
    assert np.array_equal(read_volume(tmp_path / "instance.h5")[0], ids.astype(np.uint32))


def test_sources_stream_slab_by_slab(tmp_path, monkeypatch):
    from formats import hdf5

    from emmito import sources

    volume = np.random.default_rng(3).integers(0, 4096, (40, 16, 16), dtype=np.uint16)
    spec = hdf5(tmp_path / "v.h5", "em", volume, chunks=(10, 16, 16))
    slabs = []
    real = sources.Source.read
    monkeypatch.setattr(sources.Source, "read", lambda self, z0, z1: slabs.append(z1 - z0) or real(self, z0, z1))
    convert_stack(spec, voxel_size=(40, 8, 8), image_out=tmp_path / "image.h5")
    # 16 one-slice samples for the percentiles, then whole input chunks in whole output chunks (8 deep): 16 slices.
    assert slabs == [1] * 16 + [16, 16, 8]


@pytest.mark.bad_input
def test_no_output_when_labels_from_an_array_fail_late(tmp_path):
    from formats import hdf5, zarr_array

    images = hdf5(tmp_path / "em.h5", "em", np.full((12, 8, 8), 1000, np.uint16))
    mask = np.zeros((12, 8, 8), np.uint8)
    mask[11, 3, 3] = 9  # found only when the last slab is read
    out = tmp_path / "out"
    with pytest.raises(EmmitoError, match=r"m.zarr:/mask slice 11: binary mask holds values other than 0/1/255: 9"):
        convert_stack(images, voxel_size=(40, 8, 8), image_out=out / "image.h5",
                      label_paths=zarr_array(tmp_path / "m.zarr", "mask", mask), label_out=out / "label.h5")
    assert list(out.iterdir()) == []


def test_cli_converts_an_hdf5_dataset_with_the_shift_rule(tmp_path):
    from formats import hdf5

    raw = twelve_bit_volume(depth=6, size=8)
    spec = hdf5(tmp_path / "em.h5", "volumes/raw", raw)
    params = json.dumps({"convert": {"intensity": "shift"}})
    result = run_convert("--images", spec, "--image-out", str(tmp_path / "image.h5"), "--params", params)
    assert result.returncode == 0, result.stderr
    assert "intensity shift (uint16)" in result.stderr
    image, attrs = read_volume(tmp_path / "image.h5")
    assert np.array_equal(image, (raw >> 8).astype(np.uint8))
    assert json.loads(attrs[contract.INTENSITY_MAPPING]) == {"rule": "shift", "source_dtype": "uint16"}
    again = run_convert("--images", spec, "--image-out", str(tmp_path / "again.h5"))
    assert again.returncode == 0 and "intensity percentile (uint16 [" in again.stderr
    convert_stack(spec, voxel_size=(40, 8, 8), image_out=tmp_path / "third.h5")
    assert (tmp_path / "again.h5").read_bytes() == (tmp_path / "third.h5").read_bytes(), "same input, same bytes"
