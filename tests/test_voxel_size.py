"""Voxel size: inference pools a volume to the voxel size the network was trained at, or refuses in one line.

The checkpoint records ``voxel_size``, the (z, y, x) nm of the voxels its
network saw (the training images' times ``model.downsample_xy``). ``emmito infer``
pools an image by the factor of 1, 2, 4, 8 that brings its y/x voxels nearest
that, and refuses when none comes within 25 %.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np
import pytest
import torch

from emmito import __version__, contract, io
from emmito.config import section_defaults, validate_sections
from emmito.infer import run_cli
from emmito.io import EmmitoError
from emmito.model import build_model, pooling_for_volume
from emmito.prediction import Tiling, predict_slices, to_heat
from emmito.resampling import POOLING_FACTORS, mean_pool_xy, pooling_factor

TINY = dict(filters=[2, 4], conv3d_from_level=0, pool_z_from_level=0, patch=[4, 8, 8])
TRAINED = [40.0, 8.0, 8.0]  # the voxels the network saw


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_factor_is_the_one_that_brings_the_voxels_nearest_the_trained_size():
    assert POOLING_FACTORS == (1, 2, 4, 8)
    assert pooling_factor((8, 8), (8, 8)) == 1  # exact match
    assert pooling_factor((4, 4), (8, 8)) == 2  # half the pixel size: pooled by 2
    assert pooling_factor((1, 1), (8, 8)) == 8
    assert pooling_factor((2, 2), (16, 16)) == 8
    assert pooling_factor((7, 7), (8, 8)) == 1  # 12.5 % off: near enough
    assert pooling_factor((3.5, 3.5), (8, 8)) == 2  # 7 nm after pooling
    assert pooling_factor((3, 3), (8, 8)) == 2  # 6 nm: 25 % off, the limit
    assert pooling_factor((12, 12), (8, 8)) is None  # 1.5 x coarser: no pooling makes voxels smaller
    assert pooling_factor((2.9, 2.9), (8, 8)) is None  # 5.8 nm (27.5 %) or 11.6 nm (45 %): between two factors
    assert pooling_factor((4, 8), (8, 8)) is None  # y wants 2, x wants 1: each factor is 100 % off on one axis
    assert pooling_factor((6, 6), (8, 8), factors=(1, 2)) == 1


def checkpoint_at(path, voxel_size=TRAINED, downsample_xy=1, seed=0):
    """A checkpoint of a tiny (random) network, as train writes it, recording ``voxel_size`` (None: an older one, without)."""
    torch.manual_seed(seed)
    model_cfg = {**section_defaults("model"), **TINY, contract.DOWNSAMPLE_XY: downsample_xy}
    model = build_model(model_cfg)
    with torch.no_grad():
        model.head.weight.mul_(20)  # a random net answers almost the same everywhere; this makes differences visible
    checkpoint = {
        contract.CHECKPOINT_MODEL_CONFIG: model_cfg, contract.CHECKPOINT_STATE: model.state_dict(),
        contract.CHECKPOINT_CHANNELS: ["foreground"], contract.CHECKPOINT_DOWNSAMPLE_XY: downsample_xy,
        contract.CHECKPOINT_INPUT_NORM: {"mean": 127.5, "std": 127.5}, contract.CHECKPOINT_VERSION: __version__,
    }
    if voxel_size is not None:
        checkpoint[contract.CHECKPOINT_VOXEL_SIZE] = list(voxel_size)
    contract.save_checkpoint(path, checkpoint)
    return model.eval()


def image_at(path, voxel_size, shape=(6, 24, 32)):
    image = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    contract.fixture(path, "image", image, voxel_size=voxel_size)
    return image


def infer(tmp_path, image_voxels, **checkpoint):
    """``emmito infer`` of chunk 1 (slices 4-5) with no config: (heat, attrs, image, model)."""
    model = checkpoint_at(tmp_path / "ckpt.pt", **checkpoint)
    image = image_at(tmp_path / "image.h5", image_voxels)
    args = argparse.Namespace(image=tmp_path / "image.h5", checkpoint=tmp_path / "ckpt.pt", out=tmp_path / "heat.h5", chunk=1, chunks=None)
    # What the CLI hands the stage for --params '{"infer": {"chunk_slices": 4, ...}}': every section, no model key set;
    # the training patch's windows at half overlap, as the expected heat below.
    run_cli(args, validate_sections({"infer": {"chunk_slices": 4, "tile": "patch", "tile_overlap": 0.5, "tile_crop": 0}}))
    heat, attrs = io.read_volume(tmp_path / "heat.h5")
    return heat, attrs, image, model


def expected_heat(model, image, factor):
    pooled = mean_pool_xy(image, factor)
    return to_heat(predict_slices(model, lambda a, b: pooled[a:b], image.shape[0], 4, 6, Tiling.of_patch(TINY["patch"], 0.5), 4, progress=False))


def test_a_volume_with_half_the_training_pixel_size_is_pooled_by_2(tmp_path):
    heat, attrs, image, model = infer(tmp_path, [40, 4, 4])
    assert attrs[contract.DOWNSAMPLE_XY] == 2  # the heat file records the factor used; upsample reads it there
    assert heat.shape == (1, 2, 12, 16) and attrs[contract.VOXEL_SIZE] == TRAINED
    assert np.abs(heat.astype(int) - expected_heat(model, image, 2).astype(int)).max() <= 1
    assert np.abs(heat.astype(int) - expected_heat(model, image[:, ::2, ::2], 1).astype(int)).max() > 1  # pooled, not subsampled


def test_a_volume_at_the_training_voxel_size_is_not_pooled(tmp_path):
    heat, attrs, image, model = infer(tmp_path, TRAINED)
    assert attrs[contract.DOWNSAMPLE_XY] == 1 and heat.shape == (1, 2, 24, 32)
    assert np.abs(heat.astype(int) - expected_heat(model, image, 1).astype(int)).max() <= 1


def test_a_network_trained_on_pooled_voxels_pools_a_volume_at_the_training_images_size_alike(tmp_path):
    # Trained on 8 nm images pooled by 2 (16 nm voxels): an 8 nm volume is pooled by 2 again, a 4 nm one by 4.
    assert infer(tmp_path / "a", [40, 8, 8], voxel_size=[40, 16, 16], downsample_xy=2)[1][contract.DOWNSAMPLE_XY] == 2
    assert infer(tmp_path / "b", [40, 4, 4], voxel_size=[40, 16, 16], downsample_xy=2)[1][contract.DOWNSAMPLE_XY] == 4


def test_a_checkpoint_without_a_voxel_size_pools_as_it_was_trained(tmp_path):
    heat, attrs, _, _ = infer(tmp_path, [40, 4, 4], voxel_size=None, downsample_xy=2)
    assert attrs[contract.DOWNSAMPLE_XY] == 2 and heat.shape == (1, 2, 12, 16)
    _, attrs, _, _ = infer(tmp_path / "old", [40, 4, 4], voxel_size=None, downsample_xy=1)
    assert attrs[contract.DOWNSAMPLE_XY] == 1  # no voxel-size check without the record: as before


@pytest.mark.bad_input
def test_a_volume_whose_pixels_are_1_5_times_the_training_size_is_refused_in_one_line(tmp_path):
    checkpoint_at(tmp_path / "ckpt.pt")
    image_at(tmp_path / "coarse.h5", [40, 12, 12])
    with pytest.raises(EmmitoError) as error:
        pooling_for_volume(contract.read_checkpoint(tmp_path / "ckpt.pt"), [40, 12, 12], tmp_path / "coarse.h5", tmp_path / "ckpt.pt")
    message = str(error.value)
    assert "\n" not in message
    for part in ("coarse.h5", "40x12x12 nm", "ckpt.pt", "40x8x8 nm", "25%", "resample the images"):
        assert part in message, (part, message)
    # Through the verb, with no config at all: exit 2, that line, no heat file.
    result = subprocess.run(
        [sys.executable, "-m", "emmito.cli", "infer", str(tmp_path / "coarse.h5"), str(tmp_path / "ckpt.pt"),
         str(tmp_path / "heat.h5"), "--chunk", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"emmito infer: error: {message}"
    assert not (tmp_path / "heat.h5").exists()


def test_the_infer_verb_needs_nothing_but_the_checkpoint(tmp_path):
    model = checkpoint_at(tmp_path / "ckpt.pt")
    image = image_at(tmp_path / "image.h5", [40, 4, 4], shape=(6, 16, 16))
    result = subprocess.run(
        [sys.executable, "-m", "emmito.cli", "infer", str(tmp_path / "image.h5"), str(tmp_path / "ckpt.pt"),
         str(tmp_path / "heat.h5"), "--chunk", "0"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    heat, attrs = io.read_volume(tmp_path / "heat.h5")
    # The default chunk_slices (20): one chunk holds all 6 slices; the architecture and patch are the checkpoint's.
    assert attrs[contract.DOWNSAMPLE_XY] == 2 and heat.shape == (1, 6, 8, 8) and attrs[contract.CHANNELS] == ["foreground"]
    pooled = mean_pool_xy(image, 2)
    # No config: the default window grid (infer.tile auto) over the pooled volume.
    from emmito.config import section_defaults
    from emmito.tiling import plan_tiling

    grid = plan_tiling({**section_defaults("model"), **TINY}, section_defaults("infer"), pooled.shape)
    expected = to_heat(predict_slices(model, lambda a, b: pooled[a:b], 6, 0, 6, grid, 4, progress=False))
    assert np.abs(heat.astype(int) - expected.astype(int)).max() <= 1
