"""Inference: seamless chunks, blending, downsampling, heat-file contract, checkpoint errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from emmito import __version__, contract, io
from emmito.config import section_defaults
from emmito.contract import fixture, save_checkpoint
from emmito.infer import AlignedWriter, infer_chunk, infer_chunks, run_cli, volume_tiling
from emmito.io import EmmitoError
from emmito.model import build_model, load_checkpoint
from emmito.prediction import predict_slices, predict_tiles, reflect_index, to_heat, tta_variants
from emmito.resampling import mean_pool_xy
from emmito.tiling import AxisTiling, Tiling

TINY = dict(filters=[2, 4], conv3d_from_level=0, pool_z_from_level=0, patch=[4, 8, 8])
# The window grid of releases before 0.6: the training patch at half overlap, no crop.
OLD = {"tile": "patch", "tile_overlap": 0.5, "tile_crop": 0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def params(model: dict | None = None, infer: dict | None = None) -> dict:
    return {
        "seed": 0,
        "model": {**section_defaults("model"), **TINY, **(model or {})},
        "infer": {**section_defaults("infer"), **(infer or {})},
    }


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model({**section_defaults("model"), **TINY, **overrides})
    # Random-init GroupNorm/conv nets answer almost the same everywhere; a larger head makes differences visible.
    with torch.no_grad():
        model.head.weight.mul_(20)
    return model.eval()


class Identity(torch.nn.Module):
    """A 'network' whose logits are its input: every window predicts the same value for a voxel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def expected_identity(image: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(image.astype(np.float64) - 127.5) / 127.5))


def old_grid(patch=TINY["patch"], overlap=0.5) -> Tiling:
    """Windows of the training patch at ``overlap``, no crop: the grid of releases before 0.6."""
    return Tiling.of_patch(patch, overlap)


@pytest.mark.parametrize("tile, overlap, crop", [(4, 0.5, 0), (96, 0.5, 0), (8, 0, 2), (24, 0.25, 2), (1, 0, 0), (544, 0.125, 16)])
def test_window_grid_covers_the_axis_at_a_constant_stride(tile, overlap, crop):
    axis = AxisTiling.of(tile, overlap, crop)
    for size in (1, 5, 11, 100, 192, 1024):
        starts = axis.starts(size)
        valid_lo, valid_hi = starts + axis.crop_lo, starts + axis.tile - axis.crop_hi
        assert valid_lo[0] == 0 and valid_hi[-1] >= size  # the valid regions cover the axis from its first voxel
        assert np.all(np.diff(starts) == axis.stride) and axis.stride == max(1, int((tile - 2 * crop) * (1 - overlap)))
        assert np.all(valid_lo[1:] <= valid_hi[:-1])  # no gaps
        # The fewest windows: dropping the last one would leave voxels uncovered.
        assert len(starts) == 1 or valid_hi[-2] < size
        # A run of voxels needs exactly the windows whose valid region touches it.
        touching = axis.starts(size, size // 3, size // 3 + 2)
        assert list(touching) == [s for s, lo, hi in zip(starts, valid_lo, valid_hi) if lo < size // 3 + 2 and hi > size // 3]
    weights = axis.weights(0.125)
    assert np.all(weights[: axis.crop_lo] == 0) and np.all(weights[axis.tile - axis.crop_hi :] == 0)
    assert np.all(weights[axis.crop_lo : axis.tile - axis.crop_hi] > 0)
    assert list(reflect_index(np.arange(-3, 8), 4)) == [3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1]


def test_a_crop_that_leaves_no_valid_region_is_one_line():
    with pytest.raises(EmmitoError, match="tile_crop"):
        AxisTiling.of(8, 0, 4)


GRIDS = {
    "patch, half overlap": old_grid(),
    "cropped, per-axis overlap": Tiling.of_patch([6, 10, 12], [0, 0.25, 0.5], [1, 2, 3]),
    "one window in y and x": Tiling(AxisTiling.of(4, 0.5, 0), AxisTiling(14, 9, 2, 3), AxisTiling(22, 17, 3, 2)),
}


@pytest.mark.parametrize("shape", [(11, 13, 18), (7, 5, 9)])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_blending_is_normalised_and_reflection_aligned(shape, grid):
    # With an identity network every window agrees, so any error in placement, reflection,
    # crop or weight normalisation shows up as a difference from the pointwise answer.
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    probability = predict_slices(Identity(), lambda a, b: image[a:b], shape[0], 2, shape[0] - 1, GRIDS[grid], 3, progress=False)
    assert probability.shape == (1, shape[0] - 3, *shape[1:])
    np.testing.assert_allclose(probability[0], expected_identity(image[2:-1]), atol=2e-6)


TILINGS = {
    "patch at 0.5 (before 0.6)": {"tile": "patch", "tile_overlap": 0.5, "tile_crop": 0},
    "patch at 0.25": {"tile": "patch", "tile_overlap": 0.25, "tile_crop": 0},
    "auto (the default)": {},
    "auto, overlap and crop": {"tile_overlap": [0.25, 0.5, 0.25], "tile_crop": [1, 2, 1]},
    "explicit tile, no overlap": {"tile": [6, 8, 10], "tile_overlap": 0, "tile_crop": [1, 1, 2]},
}


@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("batch_size, prefetch", [(3, 2), (1, 1)])
def test_chunked_inference_equals_whole_volume_inference_for_any_chunk_size(tiling, batch_size, prefetch):
    depth = 11
    image = np.random.default_rng(0).integers(0, 256, (depth, 10, 13), dtype=np.uint8)
    model = tiny_model()
    reads: list[tuple[int, int]] = []

    def read(a: int, b: int) -> np.ndarray:
        reads.append((a, b))
        return image[a:b]

    # 1, a divisor-free 3, 4 and 5 (none divides 11) and the whole depth as one chunk.
    for chunk_slices in (1, 3, 4, 5, 11):
        cfg = params(infer={"chunk_slices": chunk_slices, "batch_size": batch_size, "prefetch_batches": prefetch, **TILINGS[tiling]})
        grid = volume_tiling(cfg["model"], cfg["infer"], image.shape)
        whole = to_heat(predict_slices(model, read, depth, 0, depth, grid, 4, progress=False))
        assert whole.std() > 5, "the tiny model must give a non-trivial heatmap for this test to mean anything"
        n_chunks = -(-depth // chunk_slices)
        chunks = []
        for c in range(n_chunks):
            reads.clear()
            chunks.append(infer_chunk(model, read, image.shape, c, cfg["model"], cfg["infer"], progress=False)[0])
            start, stop = c * chunk_slices, min((c + 1) * chunk_slices, depth)
            # Each slice of the chunk plus its halo (less than a window each side) is read once, in increasing runs.
            slices_read = [z for a, b in reads for z in range(a, b)]
            assert slices_read == sorted(set(slices_read)), f"chunk {c} read a slice twice: {reads}"
            assert set(range(start, stop)) <= set(slices_read)
            assert min(slices_read) >= start - grid.z.tile and max(slices_read) < stop + grid.z.tile
        stitched = np.concatenate(chunks, axis=1)
        assert stitched.shape == whole.shape
        # The same bytes: each row of windows is batched alike in every run (see prediction._prepare_tiles).
        assert np.array_equal(stitched, whole), f"seam at chunk_slices={chunk_slices}"
        # Jobs of 3 chunks write the same heat, chunk by chunk, in order.
        for first in range(0, n_chunks, 3):
            parts: dict[int, list[np.ndarray]] = {}
            job = list(range(first, min(first + 3, n_chunks)))
            infer_chunks(model, read, image.shape, job, cfg["model"], cfg["infer"],
                         lambda chunk, at, heat: parts.setdefault(chunk, []).append((at, heat.copy())), progress=False)
            assert sorted(parts) == job
            for c in job:
                offsets = [at for at, _ in parts[c]]
                assert offsets[0] == 0 and offsets == sorted(offsets)
                heat = np.concatenate([h for _, h in parts[c]], axis=1)
                assert np.array_equal(heat, chunks[c]), f"job {job}, chunk {c}"


class CountingModel(torch.nn.Module):
    """Wraps a model and counts the tiles and batches it is asked for."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.tiles = 0
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tiles += x.shape[0]
        self.calls += 1
        return self.model(x)


def test_within_a_chunk_each_window_runs_exactly_once():
    depth, patch = 11, TINY["patch"]
    image = np.random.default_rng(3).integers(0, 256, (depth, 10, 13), dtype=np.uint8)
    counting = CountingModel(tiny_model())
    z_start, z_stop = 4, 8
    grid = old_grid()
    stats: dict[str, int] = {}
    predict_slices(counting, lambda a, b: image[a:b], depth, z_start, z_stop, grid, 3, progress=False, stats=stats)
    windows_yx = grid.y.count(10) * grid.x.count(13)
    z_rows = grid.z.starts(depth, z_start, z_stop)
    assert list(z_rows) == [2, 4, 6]  # the grid over 11 slices starts at 0, 2, .., 8; these touch [4, 8)
    assert counting.tiles == len(z_rows) * windows_yx == 3 * 6 == stats["windows"]
    assert counting.calls == -(-counting.tiles // 3)
    assert stats["voxels_in"] == counting.tiles * 4 * 8 * 8 and stats["voxels_out"] == 4 * 10 * 13


def test_auto_tiles_run_one_row_of_windows_per_chunk():
    """infer.tile auto: the chunk is the valid region in z, so a chunk's job runs each voxel's window once."""
    depth = 20
    image = np.random.default_rng(3).integers(0, 256, (depth, 40, 44), dtype=np.uint8)
    counting = CountingModel(tiny_model())
    cfg = params(infer={"chunk_slices": 5, "tile_crop": [1, 2, 2], "tile_memory_mb": 16})
    grid = volume_tiling(cfg["model"], cfg["infer"], image.shape)
    assert (grid.z.tile, grid.z.stride, grid.z.crop_lo, grid.z.crop_hi) == (8, 5, 1, 2)  # 5 + 2 x 1, rounded up to even
    assert grid.y.count(40) == grid.x.count(44) == 1  # one window holds the slice
    assert grid.redundancy(image.shape, 5, 10) == pytest.approx(8 * grid.y.tile * grid.x.tile / (5 * 40 * 44))
    infer_chunk(counting, lambda a, b: image[a:b], image.shape, 1, cfg["model"], cfg["infer"], progress=False)
    assert counting.tiles == 1


def test_tta_variants_are_flips_then_transposes_then_z_flips():
    assert tta_variants(1) == [(False, False, False, False)]
    four, eight, sixteen = tta_variants(4), tta_variants(8), tta_variants(16)
    assert len(set(sixteen)) == 16 and sixteen[:8] == eight and eight[:4] == four
    assert not any(z or transpose for z, _, _, transpose in four)
    assert not any(z for z, _, _, _ in eight) and sum(t for *_, t in eight) == 4
    with pytest.raises(ValueError, match="tta must be one of"):
        tta_variants(3)


def explicit_tta_mean(model: torch.nn.Module, tiles: np.ndarray, count: int) -> np.ndarray:
    """All variants' probabilities held at once, each undone with numpy, then averaged (float64)."""
    outputs = []
    for flip_z, flip_y, flip_x, transpose in tta_variants(count):
        axes = tuple(axis for axis, flip in ((2, flip_z), (3, flip_y), (4, flip_x)) if flip)
        augmented = np.flip(tiles, axes) if axes else tiles
        if transpose:
            augmented = augmented.swapaxes(3, 4)
        with torch.inference_mode():
            probability = torch.sigmoid(model(torch.from_numpy(np.ascontiguousarray(augmented)))).numpy()
        if transpose:
            probability = probability.swapaxes(3, 4)
        outputs.append(np.flip(probability, axes) if axes else probability)
    return np.mean(np.stack(outputs).astype(np.float64), axis=0)


@pytest.mark.parametrize("count", [4, 8, 16])
def test_tta_running_mean_equals_the_mean_of_the_variants(count):
    model = tiny_model(seed=4)
    # A non-square patch, so that undoing the transpose in the wrong order would fail on shape or values.
    tiles = np.random.default_rng(5).normal(size=(2, 1, 4, 8, 16)).astype(np.float32)
    with torch.inference_mode():
        running = predict_tiles(model, torch.from_numpy(tiles), count).numpy()
        plain = predict_tiles(model, torch.from_numpy(tiles), 1).numpy()
    assert running.shape == (2, 1, 4, 8, 16)
    np.testing.assert_allclose(running, explicit_tta_mean(model, tiles, count), atol=2e-6)
    assert np.abs(running - plain).max() > 1e-2, "this model is not equivariant, so TTA must change its answer"


def test_tta_with_an_equivariant_model_changes_nothing():
    image = np.random.default_rng(6).integers(0, 256, (9, 12, 10), dtype=np.uint8)
    plain = predict_slices(Identity(), lambda a, b: image[a:b], 9, 2, 7, old_grid(), 4, progress=False)
    augmented = predict_slices(Identity(), lambda a, b: image[a:b], 9, 2, 7, old_grid(), 4, progress=False, tta=16)
    np.testing.assert_allclose(augmented, plain, atol=1e-6)
    np.testing.assert_allclose(augmented[0], expected_identity(image[2:7]), atol=2e-6)


def test_tta_chunk_follows_the_config_key():
    depth = 7
    image = np.random.default_rng(7).integers(0, 256, (depth, 10, 12), dtype=np.uint8)
    model = tiny_model(seed=8)
    cfg = params(infer={"chunk_slices": 3, "tta": 8, **OLD})
    heat, offset = infer_chunk(model, lambda a, b: image[a:b], image.shape, 1, cfg["model"], cfg["infer"], progress=False)
    expected = predict_slices(model, lambda a, b: image[a:b], depth, 3, 6, old_grid(), 4, progress=False, tta=8)
    plain = predict_slices(model, lambda a, b: image[a:b], depth, 3, 6, old_grid(), 4, progress=False)
    assert offset == 3 and np.abs(heat.astype(int) - to_heat(expected).astype(int)).max() <= 1
    assert np.abs(heat.astype(int) - to_heat(plain).astype(int)).max() > 1


def test_finished_slices_are_handed_on_in_order_as_rows_finish():
    depth = 20
    image = np.random.default_rng(9).integers(0, 256, (depth, 8, 8), dtype=np.uint8)
    runs: list[tuple[int, np.ndarray]] = []
    result = predict_slices(
        tiny_model(), lambda a, b: image[a:b], depth, 2, 18, old_grid(), 1, progress=False,
        on_slices=lambda first, part: runs.append((first, part.copy())),
    )
    firsts = [first for first, _ in runs]
    assert firsts == sorted(firsts) and firsts[0] == 0 and len(runs) > 3  # streamed, not all at the end
    assert [first + part.shape[1] for first, part in runs[:-1]] == firsts[1:]
    np.testing.assert_array_equal(np.concatenate([part for _, part in runs], axis=1), result)


def pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("emmito-infer")]


class Broken(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("model exploded")


def test_a_failure_in_any_thread_reaches_the_caller_and_stops_the_others():
    image = np.random.default_rng(10).integers(0, 256, (30, 8, 8), dtype=np.uint8)
    calls: list[int] = []

    def failing_read(a: int, b: int) -> np.ndarray:
        calls.append(a)
        if len(calls) > 1:
            raise OSError("disk went away")
        return image[a:b]

    def run(model=None, read=None, **kwargs):
        predict_slices(model or tiny_model(), read or (lambda a, b: image[a:b]), 30, 0, 30, old_grid(), 1,
                       progress=False, prefetch_batches=1, **kwargs)

    with pytest.raises(OSError, match="disk went away"):
        run(read=failing_read)
    with pytest.raises(RuntimeError, match="model exploded"):
        run(model=Broken())

    def failing_write(first: int, part: np.ndarray) -> None:
        raise EmmitoError("out.h5: no space left")

    with pytest.raises(EmmitoError, match="no space left"):
        run(on_slices=failing_write)
    assert pipeline_threads() == []


class RecordingDataset:
    """Stands in for an h5py dataset with z-chunks of 4: records the z-ranges written."""

    chunks = (1, 4, 8, 8)

    def __init__(self, depth: int):
        self.data = np.zeros((1, depth, 8, 8), np.uint8)
        self.writes: list[tuple[int, int]] = []

    def __setitem__(self, key: tuple, value: np.ndarray) -> None:
        self.data[key] = value
        self.writes.append((key[1].start, key[1].stop))


def test_heat_is_written_in_whole_hdf5_chunks():
    heat = np.random.default_rng(11).integers(0, 256, (1, 17, 8, 8), dtype=np.uint8)
    dataset = RecordingDataset(17)
    writer = AlignedWriter(dataset)
    first = 0
    for count in (3, 2, 6, 1, 5):
        writer(first, heat[:, first : first + count])
        first += count
    writer.close()
    assert dataset.writes == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 17)]
    np.testing.assert_array_equal(dataset.data, heat)
    with pytest.raises(ValueError, match="in order"):
        AlignedWriter(RecordingDataset(8))(4, heat[:, :2])


def test_mean_pool_xy_averages_blocks_and_edge_remainders():
    slices = np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4)
    pooled = mean_pool_xy(slices, 2)
    assert pooled.shape == (2, 3, 2) and pooled.dtype == np.float32
    assert pooled[0, 0, 0] == np.mean([0, 1, 4, 5])
    assert pooled[1, 2, 1] == np.mean([38, 39])  # the last row has only itself to average with
    assert mean_pool_xy(slices, 1) is slices


def write_fixture(tmp_path, shape=(6, 20, 24), factor: int = 1) -> tuple:
    """An image and the checkpoint of a tiny random model trained (so to speak) at pooling ``factor``, without a voxel size."""
    image = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    fixture(tmp_path / "image.h5", "image", image, voxel_size=[40, 8, 8])
    model = tiny_model()
    save_checkpoint(
        tmp_path / "ckpt.pt",
        {"model_config": {**params()["model"], contract.DOWNSAMPLE_XY: factor}, "state_dict": model.state_dict(),
         "channels": ["foreground"], contract.CHECKPOINT_DOWNSAMPLE_XY: factor,
         "input_norm": {"mean": 127.5, "std": 127.5}, "emmito_version": __version__},
    )
    return image, model


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_infer_cli_writes_the_heat_contract(tmp_path, factor):
    # The checkpoint's pooling factor is the one used (the image's voxel size picks it where the checkpoint records one).
    image, model = write_fixture(tmp_path, factor=factor)
    cfg = params(model={contract.DOWNSAMPLE_XY: factor}, infer={"chunk_slices": 4, **OLD})
    args = argparse.Namespace(image=tmp_path / "image.h5", checkpoint=tmp_path / "ckpt.pt", out=tmp_path / "chunk_1.h5", chunk=1, chunks=None)
    run_cli(args, cfg)
    heat, attrs = io.read_volume(tmp_path / "chunk_1.h5")
    assert heat.dtype == np.uint8 and heat.shape == (1, 2, -(-20 // factor), -(-24 // factor))
    assert attrs["offset"] == 4 and attrs["volume_depth"] == 6 and attrs["downsample_xy"] == factor
    assert attrs["voxel_size"] == [40.0, 8.0 * factor, 8.0 * factor]
    assert list(attrs["channels"]) == ["foreground"]
    pooled = mean_pool_xy(image, factor)
    expected = to_heat(predict_slices(model, lambda a, b: pooled[a:b], 6, 4, 6, old_grid(), 4, progress=False))
    assert np.abs(heat.astype(int) - expected.astype(int)).max() <= 1


def test_a_job_of_chunks_writes_a_folder_of_the_same_heat_files_or_nothing(tmp_path, monkeypatch, capsys):
    write_fixture(tmp_path, shape=(10, 20, 24))
    cfg = params(infer={"chunk_slices": 3})
    single = {}
    for c in range(4):
        out = tmp_path / f"single_{c}.h5"
        run_cli(argparse.Namespace(image=tmp_path / "image.h5", checkpoint=tmp_path / "ckpt.pt", out=out, chunk=c, chunks=None), cfg)
        single[c] = io.read_volume(out)
    job = tmp_path / "heat" / "job_0"
    run_cli(argparse.Namespace(image=tmp_path / "image.h5", checkpoint=tmp_path / "ckpt.pt", out=job, chunk=None, chunks=[0, 1, 2, 3]), cfg)
    assert sorted(p.name for p in job.iterdir()) == [contract.heat_chunk_name(c) for c in range(4)]
    for c in range(4):
        heat, attrs = io.read_volume(job / contract.heat_chunk_name(c))
        assert np.array_equal(heat, single[c][0]) and attrs == single[c][1]
    # The log names the windows and the work per voxel written.
    assert "voxels through the network per voxel written" in capsys.readouterr().err
    # A failure after the first chunk's file was complete leaves no folder at all.
    import emmito.infer as infer_module

    real = infer_module.AlignedWriter.__call__
    calls = {"n": 0}

    def failing(self, first, heat):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device")
        return real(self, first, heat)

    monkeypatch.setattr(infer_module.AlignedWriter, "__call__", failing)
    broken = tmp_path / "heat" / "job_1"
    with pytest.raises(EmmitoError, match="no space left"):
        run_cli(argparse.Namespace(image=tmp_path / "image.h5", checkpoint=tmp_path / "ckpt.pt", out=broken, chunk=None, chunks=[0, 1, 2, 3]), cfg)
    assert not broken.exists() and sorted(p.name for p in (tmp_path / "heat").iterdir()) == ["job_0"]


@pytest.mark.bad_input
def test_a_checkpoint_of_another_architecture_is_refused_by_name(tmp_path):
    write_fixture(tmp_path)
    with pytest.raises(
        EmmitoError,
        match=r"ckpt\.pt was trained with model\.filters=\[2,4\], the config says \[4,8\]: retrain or fix the config "
        r"\(drop model\.filters: the checkpoint carries it\)",
    ):
        load_checkpoint(tmp_path / "ckpt.pt", params(model={"filters": [4, 8]})["model"])
    # The inference patch may differ from the training patch: it is not part of the architecture.
    model, checkpoint = load_checkpoint(tmp_path / "ckpt.pt", params(model={"patch": [2, 16, 16]})["model"])
    assert checkpoint["channels"] == ["foreground"] and not model.training


@pytest.mark.bad_input
def test_missing_or_corrupt_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(EmmitoError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(EmmitoError, match=r"bad\.pt: not a readable checkpoint .*corrupt") as error:
        load_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(error.value)


@pytest.mark.bad_input
def test_infer_verb_reports_a_mismatch_in_one_line(tmp_path):
    write_fixture(tmp_path)
    emmito = [sys.executable, "-m", "emmito.cli"]
    result = subprocess.run(
        [*emmito, "infer", str(tmp_path / "image.h5"), str(tmp_path / "ckpt.pt"), str(tmp_path / "out.h5"), "--chunk", "0",
         "--params", json.dumps({"model": {**TINY, "norm": "batch"}})],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.norm=group, the config says batch" in result.stderr
    assert not (tmp_path / "out.h5").exists()


def test_model_keys_left_to_their_defaults_never_conflict_and_set_ones_are_checked(tmp_path):
    """What the CLI hands infer (``config.Validated``): only the model keys the user set are checked against the checkpoint."""
    from emmito.config import validate_sections

    image, model = write_fixture(tmp_path)  # TINY: filters [2, 4]; the schema's default is [16, 32, 64, 128]
    args = argparse.Namespace(image=tmp_path / "image.h5", checkpoint=tmp_path / "ckpt.pt", out=tmp_path / "chunk_1.h5", chunk=1, chunks=None)
    run_cli(args, validate_sections({"infer": {"chunk_slices": 4, **OLD}}))
    expected = to_heat(predict_slices(model, lambda a, b: image[a:b], 6, 4, 6, old_grid(), 4, progress=False))
    assert np.abs(io.read_volume(args.out)[0].astype(int) - expected.astype(int)).max() <= 1
    # The inference window may differ from the training patch where it fits the network.
    args.out = tmp_path / "patch.h5"
    run_cli(args, validate_sections({"model": {"patch": [2, 16, 16]}, "infer": {"chunk_slices": 4, **OLD}}))
    expected = to_heat(predict_slices(model, lambda a, b: image[a:b], 6, 4, 6, old_grid([2, 16, 16]), 4, progress=False))
    assert np.abs(io.read_volume(args.out)[0].astype(int) - expected.astype(int)).max() <= 1
    for model_keys, message in (
        ({"filters": [16, 32, 64, 128]}, r"was trained with model\.filters=\[2,4\], the config says \[16,32,64,128\]"),
        ({"downsample_xy": 2}, r"was trained with model\.downsample_xy=1, the config says 2"),
        ({"patch": [3, 16, 16]}, r"model\.patch is \[3, 16, 16\], but a U-Net with 2 levels"),
    ):
        args.out = tmp_path / "refused.h5"
        with pytest.raises(EmmitoError, match=message):
            run_cli(args, validate_sections({"model": model_keys, "infer": {"chunk_slices": 4}}))
        assert not args.out.exists()
