"""emmito convert and PNG reading: PNG slices in, image.h5 / label.h5 out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cc3d
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from emmito import convert
from emmito.convert import binary_to_instances, convert_stack, label_components
from emmito.io import EmmitoError, list_slices, png_header, read_png_slice, read_volume

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
def test_gap_in_slice_numbers_refused_naming_the_neighbours(tmp_path):
    for z in (0, 1, 2, 4, 5):
        grey(tmp_path / f"slice_{z:04d}.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(EmmitoError, match=r"slice number 3 is missing between slice_0002.png and slice_0004.png"):
        list_slices(tmp_path)


@pytest.mark.bad_input
def test_duplicate_number_refused_naming_both(tmp_path):
    grey(tmp_path / "s01.png", np.zeros((4, 4), np.uint8))
    grey(tmp_path / "s1.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(EmmitoError, match=r"s01.png and s1.png both have slice number 1"):
        list_slices(tmp_path)


@pytest.mark.bad_input
def test_name_without_number_and_nothing_matching_refused(tmp_path):
    grey(tmp_path / "s1.png", np.zeros((4, 4), np.uint8))
    grey(tmp_path / "overview.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(EmmitoError, match="overview.png has no number"):
        list_slices(tmp_path)
    with pytest.raises(EmmitoError, match="no .png files match"):
        list_slices(str(tmp_path / "missing" / "*.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmmitoError, match="no .png files in it"):
        list_slices(tmp_path / "empty")


# ---- read_png_slice ---------------------------------------------------------------------


def test_palette_image_applies_the_palette_and_labels_read_by_index(tmp_path):
    indices = np.array([[0, 1], [2, 3]], np.uint8)
    inverted_grey = [(255 - i, 255 - i, 255 - i) for i in range(256)]
    image = read_png_slice(palette_png(tmp_path / "i.png", indices, inverted_grey), "image")
    assert image.dtype == np.uint8 and image.tolist() == [[255, 254], [253, 252]]
    # A mask whose index 1 is drawn red: read by index, it is 1, not a colour.
    mask = read_png_slice(palette_png(tmp_path / "m.png", indices % 2, [(0, 0, 0), (255, 0, 0)]), "label_binary")
    assert mask.dtype == np.uint8 and mask.tolist() == [[0, 1], [0, 1]]
    ids = read_png_slice(palette_png(tmp_path / "ids.png", indices, [(9, 9, 9)] * 4), "label_instance")
    assert ids.dtype == np.uint32 and ids.tolist() == [[0, 1], [2, 3]]


@pytest.mark.bad_input
def test_palette_with_colours_refused_as_image(tmp_path):
    path = palette_png(tmp_path / "c.png", np.array([[0, 1]], np.uint8), [(0, 0, 0), (200, 10, 10)])
    with pytest.raises(EmmitoError, match="colour"):
        read_png_slice(path, "image")


def test_rgb_and_rgba_with_equal_channels_give_that_channel(tmp_path):
    values = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    rgb = np.repeat(values[..., None], 3, axis=-1)
    rgba = np.concatenate([rgb, np.full((3, 4, 1), 7, np.uint8)], axis=-1)
    assert np.array_equal(read_png_slice(save(tmp_path / "rgb.png", Image.fromarray(rgb, "RGB")), "image"), values)
    assert np.array_equal(read_png_slice(save(tmp_path / "rgba.png", Image.fromarray(rgba, "RGBA")), "image"), values)


@pytest.mark.bad_input
def test_rgb_colour_image_refused(tmp_path):
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[1, 2] = (10, 20, 30)
    path = save(tmp_path / "colour.png", Image.fromarray(rgb, "RGB"))
    with pytest.raises(EmmitoError, match=r"colour.png: is colour \(channels differ\): export it as greyscale"):
        read_png_slice(path, "image")


def test_16_bit_grey_scaled_by_shifting(tmp_path):
    values = np.array([[0, 0x00FF, 0x0100], [0x1234, 0xFF00, 0xFFFF]], np.uint16)
    path = grey(tmp_path / "deep.png", values)
    assert png_header(path)[2] == 16
    image = read_png_slice(path, "image")
    assert image.dtype == np.uint8 and image.tolist() == [[0, 0, 1], [0x12, 0xFF, 0xFF]]
    assert read_png_slice(path, "label_instance").tolist() == values.astype(np.uint32).tolist()


def test_binary_masks_zero_one_and_zero_255(tmp_path):
    pattern = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)
    assert read_png_slice(grey(tmp_path / "a.png", pattern), "label_binary").tolist() == pattern.tolist()
    assert read_png_slice(grey(tmp_path / "b.png", pattern * 255), "label_binary").tolist() == pattern.tolist()
    one_bit = save(tmp_path / "c.png", Image.fromarray(pattern.astype(bool)))
    assert read_png_slice(one_bit, "label_binary").tolist() == pattern.tolist()


@pytest.mark.bad_input
def test_binary_mask_with_stray_values_refused_with_the_values(tmp_path):
    path = grey(tmp_path / "aa.png", np.array([[0, 255, 128], [3, 255, 0]], np.uint8))
    with pytest.raises(EmmitoError, match=r"aa.png: binary mask .* other than 0/1/255: 3, 128"):
        read_png_slice(path, "label_binary")


def test_vast_rgb_decoding_and_grey_refused(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 1] = (1, 2, 3)
    rgb[1, 0] = (0, 1, 0)
    rgb[1, 1] = (255, 255, 255)
    ids = read_png_slice(save(tmp_path / "v.png", Image.fromarray(rgb, "RGB")), "label_vast")
    assert ids.dtype == np.uint32 and ids.tolist() == [[0, 66051], [256, 2**24 - 1]]
    with pytest.raises(EmmitoError, match="use label_format instance"):
        read_png_slice(grey(tmp_path / "g.png", np.zeros((2, 2), np.uint8)), "label_vast")
    with pytest.raises(EmmitoError, match="use label_format vast"):
        read_png_slice(tmp_path / "v.png", "label_instance")


@pytest.mark.bad_input
def test_truncated_or_fake_png_refused(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    full = grey(tmp_path / "full.png", noise).read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    with pytest.raises(EmmitoError, match=r"cut.png: not a readable PNG .*: re-export it"):
        read_png_slice(tmp_path / "cut.png", "image")
    Image.fromarray(noise).save(tmp_path / "jpeg.png", format="JPEG")
    with pytest.raises(EmmitoError, match=r"jpeg.png: not a readable PNG"):
        read_png_slice(tmp_path / "jpeg.png", "image")


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
    assert attrs["voxel_size"] == [40.0, 6.0, 6.0] and attrs["offset"] == 0


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


@pytest.mark.bad_input
def test_mixed_slice_sizes_refused(tmp_path):
    images = stack(tmp_path / "images", np.zeros((3, 8, 10), np.uint8))
    grey(images[1], np.zeros((8, 9), np.uint8))
    with pytest.raises(
        EmmitoError,
        match=r"image slice 001 \(.*slice_001.png\) is 9x8 \(width x height\), the others are 10x8: crop or pad it",
    ):
        convert_stack(images, voxel_size=(40, 8, 8), image_out=tmp_path / "image.h5")
    assert not (tmp_path / "image.h5").exists()


@pytest.mark.bad_input
def test_label_count_or_size_not_matching_images_refused(tmp_path):
    images = stack(tmp_path / "images", np.zeros((3, 8, 8), np.uint8))
    too_few = stack(tmp_path / "few", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(EmmitoError, match=r"2 label slices .* but 3 image slices"):
        convert_stack(images, voxel_size=(1, 1, 1), label_paths=too_few, label_out=tmp_path / "l.h5")
    wrong_size = stack(tmp_path / "wide", np.zeros((3, 8, 9), np.uint8))
    with pytest.raises(EmmitoError, match=r"label slices .* are 9x8 but image slices .* are 8x8"):
        convert_stack(images, voxel_size=(1, 1, 1), label_paths=wrong_size, label_out=tmp_path / "l.h5")


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
    assert image.shape == (2, 6, 6) and attrs["voxel_size"] == [30.0, 5.0, 5.0]
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
