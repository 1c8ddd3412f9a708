"""upsample: traced labels -> full resolution + mode pyramid."""

from __future__ import annotations

import h5py
import hdf5plugin  # noqa: F401  (registers the Blosc filter for h5py)
import numpy as np
import pytest

from emmito import __version__, cli, contract
from emmito.io import volume_attrs
from emmito.resampling import downsample_mode, upsample_labels
from emmito.upsample import upsample_files


def test_upsample_repeats_and_crops():
    labels = np.array([[[1, 2], [3, 0]]], np.uint32)
    out = upsample_labels(labels, 2, (3, 4))
    assert out.dtype == np.uint32
    assert out[0].tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 0, 0]]


def test_upsample_pads_a_floor_pooled_edge_with_the_nearest_label():
    labels = np.array([[[1, 2]]], np.uint32)
    assert upsample_labels(labels, 2, (3, 5))[0].tolist() == [[1, 1, 2, 2, 2]] * 3


def test_upsample_by_one_is_a_copy():
    labels = np.arange(24, dtype=np.uint32).reshape(2, 3, 4)
    assert np.array_equal(upsample_labels(labels, 1, (3, 4)), labels)


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ([[5, 5], [7, 0]], 5),  # majority
        ([[0, 0], [0, 9]], 9),  # one non-zero beats three zeros
        ([[8, 3], [3, 8]], 3),  # tie -> smallest label
        ([[0, 0], [0, 0]], 0),
        ([[4, 6], [2, 0]], 2),  # all different -> smallest
    ],
)
def test_mode_of_each_2x2(block, expected):
    assert downsample_mode(np.array([block], np.uint32))[0, 0, 0] == expected


def test_mode_downsample_handles_odd_shapes():
    labels = np.zeros((2, 5, 3), np.uint32)
    labels[:, 4, 2] = 6
    labels[:, 0:2, 0:2] = 1
    out = downsample_mode(labels)
    assert out.shape == (2, 3, 2)
    assert out[0].tolist() == [[1, 0], [0, 0], [0, 6]]


def test_mode_downsample_of_a_repeated_volume_gives_it_back():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 50, size=(3, 7, 9), dtype=np.uint32)
    assert np.array_equal(downsample_mode(upsample_labels(labels, 2, (14, 18))), labels)


def test_cli_writes_main_and_pyramid_in_slabs(tmp_path):
    rng = np.random.default_rng(1)
    traced = rng.integers(0, 6, size=(7, 9, 10), dtype=np.uint32)
    traced_path, image_path, out = tmp_path / "seg_infer.h5", tmp_path / "image.h5", tmp_path / "seg.h5"
    contract.fixture(traced_path, "seg", traced, voxel_size=[40, 16, 16], downsample_xy=2, volume_depth=7)
    contract.fixture(image_path, "image", np.zeros((7, 17, 20), np.uint8), voxel_size=[40, 8, 8])
    params = '{"upsample": {"pyramid_levels": 2, "slab_slices": 3}}'
    assert cli.main(["upsample", str(traced_path), str(image_path), str(out), "--params", params]) == 0
    full = upsample_labels(traced, 2, (17, 20))
    with h5py.File(out, "r") as f:
        assert sorted(f) == ["main", "s1", "s2"]
        assert f["main"].dtype == np.uint32
        assert np.array_equal(f["main"][:], full)
        assert np.array_equal(f["s1"][:], downsample_mode(full))
        assert np.array_equal(f["s2"][:], downsample_mode(downsample_mode(full)))
        assert f["s2"].shape == (7, 5, 5)
        assert f["main"].attrs["voxel_size"].tolist() == [40, 8, 8]
        assert f["s2"].attrs["voxel_size"].tolist() == [40, 32, 32]


@pytest.mark.bad_input
def test_cli_refuses_a_traced_volume_of_another_image(tmp_path, capsys):
    traced_path, image_path = tmp_path / "seg_infer.h5", tmp_path / "image.h5"
    contract.fixture(traced_path, "seg", np.zeros((4, 5, 5), np.uint32), voxel_size=[40, 16, 16], downsample_xy=2)
    contract.fixture(image_path, "image", np.zeros((4, 30, 10), np.uint8), voxel_size=[40, 8, 8])
    assert cli.main(["upsample", str(traced_path), str(image_path), str(tmp_path / "seg.h5")]) == 2
    err = capsys.readouterr().err
    assert "seg_infer.h5" in err and "image.h5" in err
    assert not (tmp_path / "seg.h5").exists()


def test_pyramid_levels_carry_the_level_attributes(tmp_path):
    traced_path, image_path, out = tmp_path / "seg_infer.h5", tmp_path / "image.h5", tmp_path / "seg.h5"
    contract.fixture(traced_path, "seg", np.ones((3, 5, 6), np.uint32), voxel_size=[30, 10, 10], downsample_xy=2)
    contract.fixture(image_path, "image", np.zeros((3, 10, 11), np.uint8), voxel_size=[30, 5, 5])
    upsample_files(traced_path, image_path, out, pyramid_levels=2, slab_slices=2)
    with h5py.File(out, "r") as f:
        assert contract.pyramid_levels(f) == [contract.DATASET, "s1", "s2"]
        assert [f[name].shape for name in contract.pyramid_levels(f)] == [(3, 10, 11), (3, 5, 6), (3, 3, 3)]
        full, coarse = volume_attrs(f[contract.DATASET]), volume_attrs(f["s2"])
        assert list(f["s2"].attrs) == list(f[contract.DATASET].attrs)
        assert sorted(f["s2"].attrs) == sorted([*contract.BASE_KEYS, *contract.FRAME_KEYS])
    assert full[contract.VOLUME_DEPTH] == coarse[contract.VOLUME_DEPTH] == 3
    assert (full[contract.DOWNSAMPLE_XY], coarse[contract.DOWNSAMPLE_XY]) == (1, 4)
    assert coarse[contract.VOXEL_SIZE] == [30.0, 20.0, 20.0] and coarse[contract.OFFSET] == 0
    assert coarse[contract.VERSION] == __version__


def test_object_scores_are_carried_into_seg_h5(tmp_path):
    traced = np.zeros((3, 5, 6), np.uint32)
    traced[:, :2, :2], traced[1:, 3:, 3:] = 1, 2
    table = np.array([[1, 12, 2400], [2, 12, 1530]])
    traced_path, image_path, out = tmp_path / "seg_infer.h5", tmp_path / "image.h5", tmp_path / "seg.h5"
    contract.fixture(traced_path, "seg", traced, voxel_size=[30, 10, 10], downsample_xy=2, scores=table)
    contract.fixture(image_path, "image", np.zeros((3, 10, 11), np.uint8), voxel_size=[30, 5, 5])
    upsample_files(traced_path, image_path, out, pyramid_levels=1, slab_slices=2)
    with h5py.File(out, "r") as f:
        assert sorted(f) == sorted([contract.DATASET, "s1", contract.OBJECT_SCORES])
        assert contract.pyramid_levels(f) == [contract.DATASET, "s1"]
        assert f[contract.OBJECT_SCORES][...].tolist() == table.tolist()
        assert f[contract.OBJECT_SCORES].compression is None  # no filter plugin needed to read it
