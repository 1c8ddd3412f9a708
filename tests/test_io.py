"""emmito.io: atomic writes, volumes and their errors, JSON, and the PNG slices that come in."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter)
import numpy as np
import pytest
from PIL import Image

from emmito import __version__, contract, io
from emmito.io import EmmitoError


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def png(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels, mode) if mode else Image.fromarray(pixels)
    if mode == "P":  # a full grey palette, so that PIL writes 8-bit indices
        image.putpalette([value for value in range(256) for _ in range(3)])
    image.save(path, format="PNG")
    return path


# ---- atomic writes ----------------------------------------------------------------------


def test_atomic_path_moves_the_file_into_place_only_on_success(tmp_path):
    final = tmp_path / "out" / "a.txt"
    with io.atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp.name == f".a.txt.tmp-{os.getpid()}"
        tmp.write_text("done")
        assert not final.exists()
    assert final.read_text() == "done"
    assert temporaries(final.parent) == []


def test_a_failing_write_leaves_nothing(tmp_path):
    final = tmp_path / "a.txt"
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_volume_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    final = contract.fixture(tmp_path / "seg.h5", "seg", np.ones((2, 4, 4)))
    with pytest.raises(KeyboardInterrupt):
        with io.create_volume(final, (4, 4, 4), np.uint32, voxel_size=[40, 8, 8]) as ds:
            ds[:2] = 7
            raise KeyboardInterrupt
    data, _ = io.read_volume(final)
    assert data.shape == (2, 4, 4) and data.max() == 1  # the previous, complete file
    assert temporaries(tmp_path) == []


def test_stale_temporaries_of_the_same_output_are_removed(tmp_path):
    final = tmp_path / "seg.h5"
    stale = tmp_path / ".seg.h5.tmp-999999"  # a SIGKILLed writer's leftover
    stale.write_bytes(b"half a file")
    other = tmp_path / ".label.h5.tmp-999999"  # another output's: not ours to remove
    other.write_bytes(b"x")
    folder = tmp_path / ".seg.h5.tmp-1"  # a folder is never removed
    folder.mkdir()
    io.write_volume(final, np.zeros((2, 4, 4), np.uint8), voxel_size=[40, 8, 8])
    assert final.exists() and not stale.exists()
    assert other.exists() and folder.is_dir()


def test_an_output_folder_blocked_by_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(EmmitoError, match=r"out: cannot create this output folder \(.*\): a file is in the way .*; fix the output path$"):
        with io.atomic_path(tmp_path / "out" / "a.h5"):
            pass


@pytest.mark.parametrize(
    "error, words",
    [
        (OSError(28, "No space left on device"), "no space left on the device"),
        (OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')"), "no space left"),
        (OSError(122, "Disk quota exceeded"), "disk quota exceeded"),
        (OSError(13, "Permission denied"), "cannot write it (Permission denied): check the folder's permissions"),
    ],
    ids=["ENOSPC", "hdf5-ENOSPC", "EDQUOT", "EACCES"],
)
def test_write_errors_a_user_can_fix_are_one_line(tmp_path, error, words):
    final = tmp_path / "a.h5"
    with pytest.raises(EmmitoError) as info:
        with io.atomic_path(final) as tmp:
            tmp.write_text("x")
            raise error
    assert str(info.value).startswith(f"{final}: ") and words in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_pass_through(tmp_path):
    with pytest.raises(OSError, match="something else"):
        with io.atomic_path(tmp_path / "a.h5"):
            raise OSError("something else")


# ---- volumes --------------------------------------------------------------------------------


def test_write_volume_stores_the_contract(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
    io.write_volume(tmp_path / "v.h5", data, voxel_size=[40, 8, 8], offset=5, attrs={"extra": 3})
    with h5py.File(tmp_path / "v.h5", "r") as f:
        assert list(f) == [contract.DATASET]
        ds = f[contract.DATASET]
        assert ds.dtype == np.uint16 and ds.chunks == (2, 3, 4)
        assert ds.attrs[contract.VOXEL_SIZE].tolist() == [40.0, 8.0, 8.0]
        assert ds.attrs[contract.OFFSET] == 5 and ds.attrs[contract.VERSION] == __version__
        assert ds.attrs["extra"] == 3
        assert np.array_equal(ds[...], data)


def test_the_same_data_gives_the_same_bytes(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (9, 40, 40), dtype=np.uint8)
    for name in ("a.h5", "b.h5"):
        io.write_volume(tmp_path / name, data, voxel_size=[40, 8, 8])
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_default_chunks():
    assert io.default_chunks((100, 1000, 1000)) == (8, 256, 256)
    assert io.default_chunks((3, 10, 300)) == (3, 10, 256)
    assert io.default_chunks((2, 100, 50, 50)) == (1, 8, 50, 50)
    assert io.default_chunks((0, 0, 0)) == (1, 1, 1)


def test_read_volume_reads_the_range_asked_for(tmp_path):
    data = np.arange(6 * 2 * 2, dtype=np.uint32).reshape(6, 2, 2)
    path = contract.fixture(tmp_path / "seg.h5", "seg", data, offset=10, volume_depth=20)
    whole, attrs = io.read_volume(path)
    assert np.array_equal(whole, data)
    part, part_attrs = io.read_volume(path, 2, 5)  # the file's own index, not the volume's
    assert np.array_equal(part, data[2:5])
    assert part_attrs == attrs and attrs[contract.OFFSET] == 10 and attrs[contract.VOLUME_DEPTH] == 20
    assert np.array_equal(io.read_volume(path, 4)[0], data[4:])
    assert io.read_volume(path, 6, 9)[0].shape == (0, 2, 2)
    assert io.volume_shape(path) == (6, 2, 2)


def test_heat_volume_channels_come_back_as_strings(tmp_path):
    path = contract.fixture(tmp_path / "heat.h5", "heat", np.zeros((2, 3, 4, 4)), channels=["foreground", "contour"])
    data, attrs = io.read_volume(path)
    assert data.shape == (2, 3, 4, 4) and data.dtype == np.uint8
    assert attrs[contract.CHANNELS] == ["foreground", "contour"]
    assert attrs[contract.VOLUME_DEPTH] == 3 and attrs[contract.DOWNSAMPLE_XY] == 1


def test_volume_attrs_defaults_for_a_file_made_elsewhere(tmp_path):
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f[contract.DATASET] = np.zeros((2, 2, 2), np.uint8)
    with io.open_volume(tmp_path / "foreign.h5") as ds:
        attrs = io.volume_attrs(ds)
    assert attrs == {contract.VOXEL_SIZE: [1.0, 1.0, 1.0], contract.OFFSET: 0}


def test_volume_attrs_are_plain_python_values(tmp_path):
    with h5py.File(tmp_path / "odd.h5", "w") as f:
        f[contract.DATASET] = np.zeros((2, 2, 2), np.uint8)
        f[contract.DATASET].attrs[contract.VOXEL_SIZE] = np.asarray([30, 4, 4], np.int32)
        f[contract.DATASET].attrs[contract.OFFSET] = np.int64(7)
    _, attrs = io.read_volume(tmp_path / "odd.h5")
    assert attrs[contract.VOXEL_SIZE] == [30.0, 4.0, 4.0] and all(type(v) is float for v in attrs[contract.VOXEL_SIZE])
    assert attrs[contract.OFFSET] == 7 and type(attrs[contract.OFFSET]) is int


def test_open_volume_of_a_missing_file(tmp_path):
    with pytest.raises(EmmitoError, match=r"nope.h5: file not found: run the stage that makes it first \(or check the path\)$"):
        with io.open_volume(tmp_path / "nope.h5"):
            pass


@pytest.mark.parametrize(
    "content",
    [b"this is not HDF5\n", b"\x89HDF\r\n\x1a\n" + b"\0" * 100],
    ids=["garbage", "truncated-superblock"],
)
def test_open_volume_of_a_corrupt_file(tmp_path, content):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(content)
    with pytest.raises(EmmitoError) as info:
        io.read_volume(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: not a readable HDF5 file (")
    assert message.endswith("it is corrupt or truncated; delete it and rerun the stage that makes it")


def test_open_volume_of_a_half_file(tmp_path):
    path = contract.fixture(tmp_path / "image.h5", "image", np.zeros((12, 64, 64)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EmmitoError, match="corrupt or truncated"):
        io.read_volume(path)


@pytest.mark.parametrize("make", ["other-name", "group", "empty"])
def test_open_volume_without_the_main_dataset_names_what_it_found(tmp_path, make):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        if make == "other-name":
            f["raw"] = np.zeros((2, 2, 2), np.uint8)
            f["labels"] = np.zeros((2, 2, 2), np.uint8)
        elif make == "group":
            f.create_group(contract.DATASET)
    found = {"other-name": "labels, raw", "group": contract.DATASET, "empty": "nothing"}[make]
    with pytest.raises(EmmitoError) as info:
        io.volume_shape(path)
    assert str(info.value) == (
        f"{path}: no '{contract.DATASET}' dataset (found {found}): emmito volumes keep their data in "
        f"'{contract.DATASET}'; rewrite the file with that name"
    )


# ---- JSON --------------------------------------------------------------------------------------


def test_write_json_is_deterministic(tmp_path):
    io.write_json(tmp_path / "a.json", {"b": [1, 2], "a": {"z": 1.5, "y": None}})
    io.write_json(tmp_path / "b.json", {"a": {"y": None, "z": 1.5}, "b": [1, 2]})
    text = (tmp_path / "a.json").read_text()
    assert text == (tmp_path / "b.json").read_text()
    assert text == '{\n  "a": {\n    "y": null,\n    "z": 1.5\n  },\n  "b": [\n    1,\n    2\n  ]\n}\n'
    assert io.read_json(tmp_path / "a.json") == {"a": {"y": None, "z": 1.5}, "b": [1, 2]}
    assert temporaries(tmp_path) == []


def test_read_json_errors(tmp_path):
    with pytest.raises(EmmitoError, match=r"nope.json: file not found: run the stage that makes it first$"):
        io.read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EmmitoError, match=r"bad.json: not valid JSON \(.*\): delete it and rerun the stage that makes it$"):
        io.read_json(tmp_path / "bad.json")


# ---- PNG slices ------------------------------------------------------------------------------


def test_slice_number_is_the_last_run_of_digits_as_written():
    assert io.slice_number("em/images.081.png") == "081"
    assert io.slice_number("mitos_3D.010.png") == "010"
    assert io.slice_number("s2.png") == "2"
    assert io.slice_number("overview.png") is None


def test_list_slices_orders_by_number_and_skips_hidden_and_other_files(tmp_path):
    for n in (10, 9, 8, 11):
        png(tmp_path / f"s{n}.png", np.zeros((2, 2), np.uint8))
    png(tmp_path / ".s12.png", np.zeros((2, 2), np.uint8))  # hidden: skipped
    (tmp_path / "s13.txt").write_text("not a slice")
    (tmp_path / "S14.PNG").write_bytes(b"")  # the suffix counts whatever its case
    with pytest.raises(EmmitoError, match=r"slice number 12 is missing between s11.png and S14.PNG \(and 1 more missing\)"):
        io.list_slices(tmp_path)
    (tmp_path / "S14.PNG").unlink()
    assert [p.name for p in io.list_slices(tmp_path)] == ["s8.png", "s9.png", "s10.png", "s11.png"]
    assert io.list_slices(tmp_path)[0] == tmp_path / "s8.png"
    assert [p.name for p in io.list_slices(str(tmp_path / "s1*.png"))] == ["s10.png", "s11.png"]


@pytest.mark.parametrize(
    "numbers, words",
    [
        ((0, 1, 3), "slice number 2 is missing between s1.png and s3.png: add the missing slice(s)"),
        ((0, 4), "slice number 1 is missing between s0.png and s4.png (and 2 more missing)"),
        ((5, 6, 9, 12), "slice number 7 is missing between s6.png and s9.png (and 3 more missing)"),
    ],
)
def test_list_slices_names_the_first_gap(tmp_path, numbers, words):
    for n in numbers:
        png(tmp_path / f"s{n}.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(EmmitoError) as info:
        io.list_slices(tmp_path)
    assert str(info.value).startswith(f"folder {tmp_path}: ") and words in str(info.value)


@pytest.mark.parametrize(
    "pixels, mode, header",
    [
        (np.zeros((3, 5), np.uint8), None, (3, 5, 8, "grey")),
        (np.zeros((3, 5), np.uint16), None, (3, 5, 16, "grey")),
        (np.zeros((3, 5), bool), None, (3, 5, 1, "grey")),
        (np.zeros((3, 5, 3), np.uint8), "RGB", (3, 5, 8, "RGB")),
        (np.zeros((3, 5, 4), np.uint8), "RGBA", (3, 5, 8, "RGBA")),
        (np.zeros((3, 5, 2), np.uint8), "LA", (3, 5, 8, "grey+alpha")),
        (np.zeros((3, 5), np.uint8), "P", (3, 5, 8, "palette")),
    ],
    ids=["grey8", "grey16", "grey1", "rgb", "rgba", "grey-alpha", "palette"],
)
def test_png_header(tmp_path, pixels, mode, header):
    assert io.png_header(png(tmp_path / "s.png", pixels, mode)) == header


def test_png_header_errors(tmp_path):
    with pytest.raises(EmmitoError, match=r"nope.png: file not found: check the path"):
        io.png_header(tmp_path / "nope.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "jpeg.png", format="JPEG")
    with pytest.raises(EmmitoError, match=r"jpeg.png: not a readable PNG \(no PNG header; .*\): re-export it as PNG$"):
        io.png_header(tmp_path / "jpeg.png")
    (tmp_path / "short.png").write_bytes(io.PNG_SIGNATURE + b"\0\0")
    with pytest.raises(EmmitoError, match="short.png: not a readable PNG"):
        io.png_header(tmp_path / "short.png")
    odd = bytearray(png(tmp_path / "odd.png", np.zeros((2, 2), np.uint8)).read_bytes())
    odd[25] = 5  # no such colour type
    (tmp_path / "odd.png").write_bytes(bytes(odd))
    with pytest.raises(EmmitoError, match=r"odd.png: not a readable PNG \(unknown colour type 5\): re-export it$"):
        io.png_header(tmp_path / "odd.png")


def test_read_png_slice_refuses_an_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        io.read_png_slice(png(tmp_path / "s.png", np.zeros((2, 2), np.uint8)), "mask")


@pytest.mark.parametrize("bits, scale", [(2, 85), (4, 17)])
def test_low_bit_grey_images_stretch_and_ids_do_not(tmp_path, bits, scale):
    """PIL stretches 2/4-bit grey to 0..255; an image keeps the stretch, instance ids undo it."""
    values = np.array([[0, 1], [2, 3]], np.uint8)
    path = tmp_path / "low.png"
    Image.fromarray(values * scale).save(path, format="PNG", bits=bits)
    assert io.png_header(path)[2] == bits
    assert io.read_png_slice(path, "image").tolist() == (values * scale).tolist()
    ids = io.read_png_slice(path, "label_instance")
    assert ids.dtype == np.uint32 and ids.tolist() == values.tolist()


def test_grey_alpha_drops_alpha_for_every_kind(tmp_path):
    grey = np.array([[0, 1], [1, 0]], np.uint8)
    la = np.stack([grey, np.full_like(grey, 200)], axis=-1)
    path = png(tmp_path / "la.png", la, "LA")
    assert io.read_png_slice(path, "image").tolist() == grey.tolist()
    assert io.read_png_slice(path, "label_binary").tolist() == grey.tolist()
    assert io.read_png_slice(path, "label_instance").tolist() == grey.tolist()


def rgb16_png(path: Path, rgb: np.ndarray) -> Path:
    """A 16-bit RGB PNG (which PIL cannot write), chunk by chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = rgb.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in rgb)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(io.PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def test_16_bit_rgb_gives_its_high_byte_and_is_refused_as_vast(tmp_path):
    grey = np.array([[0x0000, 0x12FF], [0xAB01, 0xFFFF]], np.uint16)
    path = rgb16_png(tmp_path / "deep.png", np.repeat(grey[..., None], 3, axis=-1))
    assert io.png_header(path) == (2, 2, 16, "RGB")
    assert io.read_png_slice(path, "image").tolist() == [[0x00, 0x12], [0xAB, 0xFF]]
    with pytest.raises(EmmitoError, match=r"deep.png: VAST labels are 8-bit RGB, this one is 16-bit: re-export it from VAST$"):
        io.read_png_slice(path, "label_vast")


def test_vast_palette_colours_decode_as_ids(tmp_path):
    image = Image.fromarray(np.array([[0, 1]], np.uint8), mode="P")
    image.putpalette([0, 0, 0, 1, 2, 3])
    image.save(tmp_path / "p.png", format="PNG")
    assert io.read_png_slice(tmp_path / "p.png", "label_vast").tolist() == [[0, 66051]]
    assert io.read_png_slice(tmp_path / "p.png", "label_instance").tolist() == [[0, 1]]
