"""emmito.sources: every input format reads back what was written; describe is cheap; one-line errors."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from formats import generic_tiff_stack, hdf5, n5, png_slices, tiff_slices, tiff_stack, zarr_array

from emmito import io, sources
from emmito.io import EmmitoError
from emmito.sources import IntensityMapping, choose_mapping, describe, input_files, open_source

RNG = np.random.default_rng(16)
VOLUME8 = RNG.integers(0, 256, (7, 12, 20), dtype=np.uint8)
VOLUME12 = RNG.integers(0, 4096, (7, 12, 20), dtype=np.uint16)  # a 12-bit detector in 16 bits
VOLUMEF = RNG.normal(0.0, 1.0, (7, 12, 20)).astype(np.float32)
IDS = RNG.integers(0, 3, (7, 12, 20), dtype=np.uint64) * np.uint64(2**31 - 1)  # uint64 ids up to 2^32 - 2
DEFAULTS = {"intensity": "percentile", "percentiles": [0.1, 99.9], "sample_slices": 16}


# ---- every format reads back equal --------------------------------------------------------

WRITERS = {
    "png-slices-8bit": (lambda t: png_slices(t / "png", VOLUME8), VOLUME8, "png slices"),
    "png-slices-16bit": (lambda t: png_slices(t / "png16", VOLUME12), VOLUME12, "png slices"),
    "tiff-slices-16bit": (lambda t: tiff_slices(t / "tif", VOLUME12), VOLUME12, "tiff slices"),
    "tiff-slices-float": (lambda t: tiff_slices(t / "tiff", VOLUMEF, name="em.{:04d}.tiff"), VOLUMEF, "tiff slices"),
    "tiff-glob": (lambda t: tiff_slices(t / "g", VOLUME8) + "/slice_*.tif", VOLUME8, "tiff slices"),
    "tiff-stack": (lambda t: tiff_stack(t / "stack.tif", VOLUME12), VOLUME12, "tiff stack"),
    "tiff-stack-imagej": (lambda t: tiff_stack(t / "ij.tif", VOLUME8, imagej=True), VOLUME8, "tiff stack"),
    "tiff-stack-generic": (lambda t: generic_tiff_stack(t / "gen.tiff", VOLUME12), VOLUME12, "tiff stack"),
    "tiff-stack-compressed": (lambda t: tiff_stack(t / "z.tif", VOLUME12, compression="zlib"), VOLUME12, "tiff stack"),
    "hdf5": (lambda t: hdf5(t / "em.h5", "volumes/raw", VOLUME12, chunks=(2, 12, 20)), VOLUME12, "hdf5"),
    "hdf5-blosc": (
        lambda t: hdf5(t / "b.hdf5", "raw", VOLUMEF, chunks=(1, 12, 20), **io.compression()), VOLUMEF, "hdf5",
    ),
    "hdf5-one-dataset-no-path": (lambda t: hdf5(t / "one.h5", "data", VOLUME8).split(":")[0], VOLUME8, "hdf5"),
    "zarr-v3": (lambda t: zarr_array(t / "em.zarr", "s0", VOLUME12), VOLUME12, "zarr"),
    "zarr-v2": (lambda t: zarr_array(t / "v2.zarr", "raw/s0", VOLUMEF, zarr_format=2), VOLUMEF, "zarr"),
    "zarr-the-array-itself": (lambda t: zarr_array(t / "arr.zarr", "", VOLUME8), VOLUME8, "zarr"),
    "zarr-slash-path": (lambda t: zarr_array(t / "sl.zarr", "a/b", VOLUME8).replace(":/", "/"), VOLUME8, "zarr"),
    "n5": (lambda t: n5(t / "em.n5", "raw/s0", VOLUME12), VOLUME12, "n5"),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_format_reads_back_what_was_written(tmp_path, name):
    write, volume, fmt = WRITERS[name]
    spec = write(tmp_path)
    described = describe(spec)
    assert (described.format, described.shape, described.dtype) == (fmt, volume.shape, str(volume.dtype))
    with open_source(spec, "image") as source:
        source.check()
        assert source.shape == volume.shape and source.dtype == volume.dtype
        assert np.array_equal(source.read(0, volume.shape[0]), volume)
        assert np.array_equal(source.read(2, 5), volume[2:5])  # any slab, lazily
        assert np.array_equal(source.read(6, 7), volume[6:7])


def test_a_slice_folder_is_listed_once_then_remembered_until_it_changes(tmp_path, monkeypatch):
    folder = tiff_slices(tmp_path / "tif", VOLUME8)
    cache = tmp_path / "results" / ".listings"
    first = sources.describe_cached(folder, cache)
    assert (first.depth, first.height, first.width, first.dtype) == (7, 12, 20, "uint8")
    assert first.files == (folder,)  # convert's one input: the folder, not 7 (or 100,000) slices
    listed = []
    real = sources.slice_paths
    monkeypatch.setattr(sources, "slice_paths", lambda where: listed.append(where) or real(where))
    assert sources.describe_cached(folder, cache) == first and listed == []  # remembered: no listing
    tifffile.imwrite(f"{folder}/slice_007.tif", VOLUME8[0])  # a slice added changes the folder
    assert sources.describe_cached(folder, cache).depth == 8 and len(listed) == 1
    (tmp_path / "tif" / "slice_003.tif").unlink()  # a gap: the one-line error, not the remembered depth
    with pytest.raises(EmmitoError, match="slice number 3 is missing"):
        sources.describe_cached(folder, cache)
    hdf5_spec = hdf5(tmp_path / "em.h5", "raw", VOLUME8)
    assert sources.describe_cached(hdf5_spec, cache) == describe(hdf5_spec)  # containers: their metadata as before


def test_input_files_are_the_slices_or_the_one_container(tmp_path):
    folder = tiff_slices(tmp_path / "tif", VOLUME8)
    assert input_files(folder) == [f"{folder}/slice_{z:03d}.tif" for z in range(7)]
    assert input_files(tiff_stack(tmp_path / "s.tif", VOLUME8)) == [str(tmp_path / "s.tif")]
    assert input_files(hdf5(tmp_path / "e.h5", "em", VOLUME8)) == [str(tmp_path / "e.h5")]
    assert input_files(zarr_array(tmp_path / "e.zarr", "g/a", VOLUME8)) == [str(tmp_path / "e.zarr")]
    assert input_files(n5(tmp_path / "e.n5", "raw", VOLUME8)) == [str(tmp_path / "e.n5")]


def test_tiff_slices_ordered_by_the_number_in_their_names(tmp_path):
    for z in (10, 2, 1, 3, 4, 5, 6, 7, 8, 9):
        tifffile.imwrite(tmp_path / f"s{z}.tif", np.full((2, 3), z, np.uint16))
    with open_source(str(tmp_path), "image") as source:
        assert [int(v) for v in source.read(0, 10)[:, 0, 0]] == list(range(1, 11))
        assert source.where(0) == f"slice 1 ({tmp_path / 's1.tif'})"


def test_n5_dimensions_are_x_first_on_disk(tmp_path):
    """N5's attributes.json lists [x, y, z]; the source gives (z, y, x)."""
    spec = n5(tmp_path / "x.n5", "raw", VOLUME8)
    attributes = json.loads((tmp_path / "x.n5" / "raw" / "attributes.json").read_text())
    assert attributes["dimensions"] == [20, 12, 7]
    assert describe(spec).shape == (7, 12, 20)


def test_rgb_tiff_with_equal_channels_reads_as_grey_and_vast_decodes_ids(tmp_path):
    rgb = np.repeat(VOLUME8[..., None], 3, axis=-1)
    for spec in (tiff_slices(tmp_path / "rgb", rgb), tiff_stack(tmp_path / "rgb.tif", rgb)):
        with open_source(spec, "image") as source:
            assert source.dtype == np.uint8 and np.array_equal(source.read(0, 7), VOLUME8)
    vast = np.zeros((2, 4, 4, 3), np.uint8)
    vast[0, 1, 1], vast[1, 2, 3] = (1, 2, 3), (0, 1, 0)
    for spec in (tiff_slices(tmp_path / "vast", vast), tiff_stack(tmp_path / "vast.tif", vast)):
        with open_source(spec, "vast") as source:
            ids = source.read(0, 2)
            assert ids.dtype == np.uint32 and ids[0, 1, 1] == 66051 and ids[1, 2, 3] == 256 and ids.sum() == 66051 + 256


def test_label_kinds_from_arrays(tmp_path):
    mask = (VOLUME8 > 128).astype(np.uint8) * 255
    with open_source(zarr_array(tmp_path / "m.zarr", "mask", mask), "binary") as source:
        assert source.dtype == np.uint8 and np.array_equal(source.read(0, 7), mask // 255)
    with open_source(hdf5(tmp_path / "ids.h5", "ids", IDS), "instance") as source:
        assert source.dtype == np.uint32 and np.array_equal(source.read(0, 7), IDS.astype(np.uint32))
    with open_source(tiff_stack(tmp_path / "b.tif", mask.astype(bool)), "binary") as source:
        assert np.array_equal(source.read(0, 7), mask // 255)


# ---- describe is cheap --------------------------------------------------------------------


def test_describe_reads_no_pixels(tmp_path, monkeypatch):
    specs = [
        png_slices(tmp_path / "png", VOLUME8),
        tiff_slices(tmp_path / "tif", VOLUME12),
        tiff_stack(tmp_path / "s.tif", VOLUME12),
        generic_tiff_stack(tmp_path / "g.tif", VOLUME12),
        hdf5(tmp_path / "e.h5", "em", VOLUME12),
        zarr_array(tmp_path / "e.zarr", "em", VOLUME12),
        n5(tmp_path / "e.n5", "em", VOLUME12),
    ]

    def no_pixels(*args, **kwargs):
        raise AssertionError("describe read pixels")

    monkeypatch.setattr(io, "_decode_png", no_pixels)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_pixels)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", no_pixels)
    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_pixels)
    monkeypatch.setattr(zarr.Array, "__getitem__", no_pixels)
    for spec in specs:
        assert describe(spec).shape == (7, 12, 20)


def test_describe_lists_a_folder_once_and_reads_one_header(tmp_path, monkeypatch):
    folder = png_slices(tmp_path / "many", np.zeros((300, 4, 4), np.uint8), name="s{:05d}.png")
    headers = []
    real = sources.png_header
    monkeypatch.setattr(sources, "png_header", lambda path: headers.append(path) or real(path))
    described = describe(folder)
    assert described.shape == (300, 4, 4) and len(described.files) == 300
    assert headers == [tmp_path / "many" / "s00000.png"]


# ---- one-line errors naming the file ------------------------------------------------------


def _write_corrupt_h5(t):
    (t / "bad.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 40)
    return f"{t}/bad.h5:/em"


def _write_truncated_stack(t):
    tiff_stack(t / "cut.tif", VOLUME12)
    data = (t / "cut.tif").read_bytes()
    (t / "cut.tif").write_bytes(data[: len(data) // 2])
    return str(t / "cut.tif")


def _write_mixed_sizes(t):
    tiff_slices(t / "m", VOLUME8)
    tifffile.imwrite(t / "m" / "slice_004.tif", np.zeros((12, 19), np.uint8))
    return str(t / "m")


def _write_mixed_depths(t):
    tiff_slices(t / "d", VOLUME8)
    tifffile.imwrite(t / "d" / "slice_003.tif", np.zeros((12, 20), np.uint16))
    return str(t / "d")


def _write_colour_tiff(t):
    rgb = np.repeat(VOLUME8[..., None], 3, axis=-1)
    rgb[2, 3, 4] = (10, 20, 30)
    return tiff_slices(t / "c", rgb)


def _write_multipage_slice(t):
    tiff_slices(t / "p", VOLUME8)
    tifffile.imwrite(t / "p" / "slice_002.tif", VOLUME8[:3], photometric="minisblack")
    return str(t / "p")


def _write_png_and_tiff(t):
    png_slices(t / "both", VOLUME8[:2])
    tifffile.imwrite(t / "both" / "slice_009.tif", VOLUME8[0])
    return str(t / "both")


def _write_uneven_stack(t):
    with tifffile.TiffWriter(t / "uneven.tif") as tif:
        for z in range(4):
            tif.write(np.zeros((12, 20 if z != 2 else 18), np.uint8), metadata=None, contiguous=False)
    return str(t / "uneven.tif")


ERRORS = {
    "hdf5-missing-dataset": (lambda t: hdf5(t / "e.h5", "em/raw", VOLUME8).replace("raw", "row"), "image",
                             ["e.h5: no dataset /em/row in it (it holds /em/raw)", "fix the path after the colon"]),
    "hdf5-group-not-dataset": (lambda t: hdf5(t / "e.h5", "em/raw", VOLUME8).replace("/raw", ""), "image",
                               ["e.h5:/em is a group, not a dataset", "name a dataset"]),
    "hdf5-two-datasets-no-path": (lambda t: hdf5(t / "e.h5", "b", VOLUME8) and hdf5(t / "e.h5", "a", VOLUME8).split(":")[0],
                                  "image", ["e.h5: name the dataset", "(it holds /a, /b)"]),
    "hdf5-missing-file": (lambda t: f"{t}/nope.h5:/em", "image", ["nope.h5: HDF5 file not found: check the path"]),
    "hdf5-corrupt": (_write_corrupt_h5, "image", ["bad.h5: not a readable HDF5 file", "re-export it"]),
    "hdf5-2d": (lambda t: hdf5(t / "e.h5", "plane", VOLUME8[0]), "image",
                ["e.h5:/plane: a 2D array (shape (12, 20)), not 3D (z, y, x)"]),
    "zarr-4d": (lambda t: zarr_array(t / "e.zarr", "c", np.zeros((2, 3, 4, 5), np.uint8)), "image",
                ["e.zarr:/c: a 4D array (shape (2, 3, 4, 5)), not 3D (z, y, x)", "one channel"]),
    "zarr-missing-path": (lambda t: zarr_array(t / "e.zarr", "em/s0", VOLUME8).replace("s0", "s1"), "image",
                          ["e.zarr: no array at /em/s1", "(it holds /em/s0)", "fix the path after the colon"]),
    "zarr-group-not-array": (lambda t: zarr_array(t / "e.zarr", "em/s0", VOLUME8).split(":")[0], "image",
                             ["e.zarr: is a zarr group, not an array (it holds /em/s0)"]),
    "n5-missing-dataset": (lambda t: n5(t / "e.n5", "raw", VOLUME8).replace("raw", "rew"), "image",
                           ["e.n5:/rew: no N5 dataset at /rew"]),
    "tiff-truncated-stack": (_write_truncated_stack, "image", ["cut.tif", "corrupt or truncated", "re-export it"]),
    "tiff-mixed-sizes": (_write_mixed_sizes, "image",
                         ["image slice 004", "slice_004.tif) is 19x12 (width x height), the others are 20x12: crop or pad it"]),
    "tiff-mixed-bit-depths": (_write_mixed_depths, "image",
                              ["image slice 003", "holds uint16 values, the others uint8", "same bit depth"]),
    "tiff-colour": (_write_colour_tiff, "image", ["slice_002.tif", "is colour (channels differ): export it as greyscale"]),
    "tiff-multipage-slice": (_write_multipage_slice, "image", ["slice_002.tif: holds a (3, 12, 20) image", "one 2D image per file"]),
    "png-and-tiff-mixed": (_write_png_and_tiff, "image", ["holds both PNG (slice_000.png) and TIFF (slice_009.tif)"]),
    "tiff-stack-pages-differ": (_write_uneven_stack, "image", ["uneven.tif: its pages are not all alike", "same size and type"]),
    "vast-from-hdf5": (lambda t: hdf5(t / "e.h5", "ids", IDS), "vast",
                       ["label_format vast reads RGB PNG or TIFF slices", "use label_format instance"]),
    "instance-from-float": (lambda t: zarr_array(t / "f.zarr", "ids", VOLUMEF), "instance",
                            ["f.zarr:/ids: holds float32 values: instance ids must be integers"]),
    "instance-negative": (lambda t: hdf5(t / "n.h5", "ids", -VOLUME8.astype(np.int16)), "instance",
                          ["n.h5:/ids slice 0: holds negative ids", "renumber them"]),
    "binary-stray-values": (lambda t: zarr_array(t / "b.zarr", "m", VOLUME8), "binary",
                            ["b.zarr:/m slice 0: binary mask holds values other than 0/1/255", "export a clean 0/255"]),
    "vast-grey-tiff": (lambda t: tiff_slices(t / "g", VOLUME8), "vast", ["slice_000.tif", "label_format vast needs 8-bit RGB slices"]),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_sources_refused_in_one_line_naming_the_file(tmp_path, name):
    write, kind, words = ERRORS[name]
    spec = write(tmp_path)
    with pytest.raises(EmmitoError) as info:
        with open_source(spec, kind) as source:
            source.check()
            source.read(0, source.shape[0])
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


# ---- the intensity mapping ------------------------------------------------------------------


def test_8_bit_is_kept_as_it_is_and_16_bit_can_shift(tmp_path):
    with open_source(tiff_stack(tmp_path / "a.tif", VOLUME8), "image") as source:
        mapping = choose_mapping(source, DEFAULTS)
    assert mapping == IntensityMapping("identity", "uint8")
    assert np.array_equal(mapping.apply(VOLUME8), VOLUME8)
    with open_source(tiff_stack(tmp_path / "b.tif", VOLUME12), "image") as source:
        mapping = choose_mapping(source, {**DEFAULTS, "intensity": "shift"})
    assert mapping.rule == "shift" and np.array_equal(mapping.apply(VOLUME12), (VOLUME12 >> 8).astype(np.uint8))
    with open_source(tiff_stack(tmp_path / "c.tif", VOLUMEF), "image") as source:
        assert choose_mapping(source, {**DEFAULTS, "intensity": "shift"}).rule == "percentile"  # float: always


def test_percentile_mapping_is_linear_and_clipped():
    mapping = IntensityMapping("percentile", "uint16", 100.0, 4000.0, (0.1, 99.9), 16)
    values = np.array([0, 100, 2050, 4000, 65535], np.uint16)
    assert mapping.apply(values).tolist() == [0, 0, 128, 255, 255]
    floats = np.array([np.nan, -np.inf, 0.5, np.inf], np.float32)
    assert IntensityMapping("percentile", "float32", 0.0, 1.0).apply(floats).tolist() == [0, 0, 128, 255]
    assert IntensityMapping.from_json(mapping.to_json()) == mapping
    assert json.loads(mapping.to_json()) == {
        "rule": "percentile", "source_dtype": "uint16", "low": 100.0, "high": 4000.0,
        "percentiles": [0.1, 99.9], "sample_slices": 16,
    }


def test_percentiles_come_from_evenly_spaced_sample_slices(tmp_path, monkeypatch):
    volume = np.zeros((40, 8, 8), np.uint16)
    for z in range(40):
        volume[z] = 1000 + z  # each slice one value: the sample decides the percentiles
    assert sources.sample_positions(40, 4) == [0, 13, 26, 39]
    assert sources.sample_positions(3, 16) == [0, 1, 2]
    with open_source(hdf5(tmp_path / "v.h5", "em", volume), "image") as source:
        reads = []
        real = source.read
        monkeypatch.setattr(source, "read", lambda z0, z1: reads.append((z0, z1)) or real(z0, z1))
        mapping = choose_mapping(source, {**DEFAULTS, "percentiles": [0, 100], "sample_slices": 4})
    assert reads == [(0, 1), (13, 14), (26, 27), (39, 40)]
    assert (mapping.low, mapping.high, mapping.sample_slices) == (1000.0, 1039.0, 4)
