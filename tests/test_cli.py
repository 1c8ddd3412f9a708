"""The CLI through subprocess, on small synthetic HDF5 files (torch-em style)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from tinyproject import EMMITO

from emmito import contract, io


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
    contract.fixture(tmp_path / "heat.h5", "heat", heat[None], offset=24, volume_depth=heat.shape[0])
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


def test_sigterm_inside_a_constructor_leaves_our_line_last(monkeypatch, capsys):
    """A SIGTERM inside tqdm.__init__ (before it sets ``pos``) made tqdm.__del__ print a traceback after our line."""
    import argparse
    import signal
    import sys
    import types

    from emmito import cli

    class HalfBuilt:
        def __init__(self):
            raise cli.Terminated()  # the handler ran here, before the attribute below was set

        def __del__(self):
            abs(self.pos)  # AttributeError, as tqdm.close()

    noise = []
    monkeypatch.setattr(sys, "unraisablehook", noise.append)
    monkeypatch.setattr(cli, "import_module", lambda name: types.SimpleNamespace(run_cli=lambda args, params: HalfBuilt()))
    status = cli._run_verb(argparse.Namespace(verb="upsample"))
    assert status == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines() == [
        "emmito upsample: terminated (SIGTERM): no partial output was kept; rerun the job"
    ]
    assert noise == []
    assert sys.unraisablehook == noise.append  # restored


# ---- stage_config: the boundary where sections are validated, once ----------------------------


def stage_args(argv: list[str]):
    from emmito import cli

    return cli.build_parser().parse_args(argv)


def test_stage_config_fills_every_section_and_records_the_params_keys():
    from emmito import cli

    params = {"segment": {"min_size": 5}, "train": {"discriminative": {"support_voxels": 64}}, "output_version": 3}
    config = cli.stage_config(stage_args(["segment", "h.h5", "s.h5", "--params", json.dumps(params)]))
    assert set(config) == set(cli.SECTIONS)  # complete: every section, no volumes, no output version
    assert config["segment"]["min_size"] == 5 and config["segment"]["seed_threshold"] == 150
    assert config["train"]["discriminative"]["support_voxels"] == 64
    assert config.explicit == {"segment", "segment.min_size", "train", "train.discriminative", "train.discriminative.support_voxels"}
    assert json.loads(json.dumps(config)) == dict(config)


def test_stage_config_without_parameters_is_all_defaults():
    from emmito import cli, config

    sections = cli.stage_config(stage_args(["segment", "h.h5", "s.h5"]))
    assert sections["segment"] == config.section_defaults("segment") and sections.explicit == frozenset()


def test_stage_config_takes_the_config_file_then_params_on_top(tmp_path):
    from emmito import cli

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({
        "volumes": {"v": {"images": "em/"}},
        "segment": {"min_size": 7, "seed_threshold": 120},
        "train": {"discriminative": {"gamma": 0.5}, "iterations": 3},
    }))
    params = {"segment": {"min_size": 9}, "train": {"discriminative": {"support_voxels": 64}}}
    config = cli.stage_config(stage_args(["segment", "h.h5", "s.h5", "--config", str(path), "--params", json.dumps(params)]))
    assert "volumes" not in config
    assert config["segment"]["min_size"] == 9 and config["segment"]["seed_threshold"] == 120
    assert {"segment.min_size", "segment.seed_threshold", "train.iterations"} <= config.explicit
    # --params replaces train.discriminative whole (one level into a section): the file's gamma is gone
    assert config["train"]["iterations"] == 3 and config["train"]["discriminative"]["gamma"] == 0.0001
    assert "train.discriminative.gamma" not in config.explicit
    assert "train.discriminative.support_voxels" in config.explicit
    assert not any(key.startswith("volumes") for key in config.explicit)


def test_stage_config_is_the_workflow_config_from_params_and_runtime():
    """What a rule passes (config.stage_params, config.runtime_params) gives the stage the config's own values."""
    from emmito import cli
    from emmito import config as cfg

    config = cfg.validate({
        "volumes": {"v": {"images": "em/"}},
        "model": {"filters": [4, 8]},
        "infer": {"volumes": ["v"], "tta": 4, "batch_size": 8, "threads": 2},
        "segment": {"min_size": 5},
    })
    params, runtime = cfg.stage_params(config, "infer"), cfg.runtime_params(config, "infer")
    assert "batch_size" not in params["infer"] and runtime["infer"]["batch_size"] == 8
    sections = cli.stage_config(stage_args(
        ["infer", "i.h5", "c.pt", "o.h5", "--chunk", "0", "--params", json.dumps(params), "--runtime", json.dumps(runtime)]
    ))
    assert sections["infer"] == config["infer"] | {"volumes": []}  # infer.volumes is the workflow's: the default
    assert sections["model"] == config["model"]
    # keys this stage's params do not hold are defaults, not the config's
    assert sections["segment"]["min_size"] == 1000
    # what the user set is the params' and runtime's explicit lists: not every key they carry
    assert sections.explicit == {"model.filters", "infer.tta", "infer.batch_size", "infer.threads"}
    assert not sections.is_explicit("infer.blend_sigma") and not sections.is_explicit("model.norm")


def test_runtime_goes_over_params_and_an_empty_explicit_list_means_all_defaults():
    from emmito import cli

    params = {"infer": {"tta": 4, "batch_size": 2}, "explicit": [], "output_version": 1}
    runtime = {"infer": {"batch_size": 16}}
    sections = cli.stage_config(stage_args(
        ["infer", "i.h5", "c.pt", "o.h5", "--chunk", "0", "--params", json.dumps(params), "--runtime", json.dumps(runtime)]
    ))
    assert sections["infer"]["tta"] == 4 and sections["infer"]["batch_size"] == 16
    # no explicit list in --runtime: its keys count as set; the params' list says none of theirs were
    assert sections.explicit == {"infer", "infer.batch_size"}


@pytest.mark.bad_input
def test_bad_runtime_json_is_one_line(tmp_path):
    result = emmito("segment", "a.h5", "b.h5", "--runtime", "[1]")
    assert result.returncode == 2 and "--runtime must be a JSON object of config sections" in result.stderr
    result = emmito("segment", "a.h5", "b.h5", "--runtime", '{"segment": {"thread": 1}}')
    assert result.returncode == 2 and "--runtime: unknown key 'thread' in 'segment'" in result.stderr


def test_every_verb_is_in_the_parser():
    from emmito import cli

    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if a.dest == "verb").choices
    assert list(verbs) == [
        "synth", "convert", "train", "infer", "tune", "merge", "segment", "trace", "upsample", "evaluate", "export",
        "measure", "suggest", "crop", "view", "report", "summary",
    ]
    staged = [name for name, sub in verbs.items() if any(a.dest == "params" for a in sub._actions)]
    assert staged == ["convert", "train", "infer", "tune", "merge", "segment", "trace", "upsample", "evaluate", "export", "measure", "suggest"]
    assert staged == [name for name, sub in verbs.items() if any(a.dest == "runtime" for a in sub._actions)]
