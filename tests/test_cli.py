"""The CLI through subprocess, on small synthetic HDF5 files (torch-em style)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from tinyproject import EMMITO

from emmito import io


def emmito(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EMMITO, *args], capture_output=True, text=True, timeout=120)


def blob_heat(shape=(12, 48, 48)) -> np.ndarray:
    z, y, x = np.indices(shape)
    heat = np.zeros(shape, np.float32)
    for cz, cy, cx in ((6, 14, 14), (6, 34, 32)):
        heat = np.maximum(heat, np.exp(-(((z - cz) / 4) ** 2 + ((y - cy) / 7) ** 2 + ((x - cx) / 7) ** 2)))
    return np.round(heat * 255).astype(np.uint8)


def test_version():
    result = emmito("--version")
    assert result.returncode == 0 and result.stdout.startswith("emmito ")


def test_segment_verb_writes_a_labelled_block(tmp_path):
    heat = blob_heat()
    attrs = {"channels": ["foreground"], "volume_depth": heat.shape[0], "downsample_xy": 1}
    io.write_volume(tmp_path / "heat.h5", heat[None], voxel_size=[40, 8, 8], offset=24, attrs=attrs)
    result = emmito("segment", str(tmp_path / "heat.h5"), str(tmp_path / "seg.h5"), "--params", json.dumps({"segment": {"min_size": 50}}))
    assert result.returncode == 0, result.stderr
    seg, seg_attrs = io.read_volume(tmp_path / "seg.h5")
    assert seg.dtype == np.uint32 and seg.shape == heat.shape
    assert set(np.unique(seg)) == {0, 1, 2}
    assert seg_attrs["offset"] == 24


@pytest.mark.bad_input
def test_missing_input_is_one_line_without_traceback(tmp_path):
    result = emmito("segment", str(tmp_path / "nope.h5"), str(tmp_path / "seg.h5"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "nope.h5" in result.stderr and "file not found" in result.stderr
    assert not (tmp_path / "seg.h5").exists()


@pytest.mark.bad_input
def test_bad_params_json_is_one_line(tmp_path):
    result = emmito("segment", "a.h5", "b.h5", "--params", "{not json")
    assert result.returncode == 2 and "--params is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.bad_input
def test_corrupt_hdf5_is_one_line(tmp_path):
    bad = tmp_path / "heat.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    result = emmito("segment", str(bad), str(tmp_path / "seg.h5"))
    assert result.returncode == 2 and "corrupt or truncated" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "seg.h5").exists()


def test_sigterm_while_the_handler_is_being_set_is_caught(monkeypatch, capsys, tmp_path):
    """Python runs a signal's handler at its next check, which can be right after signal.signal returns."""
    import signal

    from emmito import cli

    real_signal = signal.signal

    def set_then_deliver(signum, handler):
        previous = real_signal(signum, handler)
        if handler is cli._raise_terminated:
            handler(signum, None)  # the SIGTERM that arrived during the call
        return previous

    monkeypatch.setattr(cli.signal, "signal", set_then_deliver)
    status = cli.main(["segment", str(tmp_path / "heat.h5"), str(tmp_path / "seg.h5")])
    assert status == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip() == "emmito segment: terminated (SIGTERM): no partial output was kept; rerun the job"
    assert not list(tmp_path.iterdir())
    assert signal.getsignal(signal.SIGTERM) is not cli._raise_terminated
