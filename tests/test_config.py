"""The config schema: defaults, typos, ranges and the cross-key rules."""

from __future__ import annotations

import pytest
import yaml

from emmito import config as cfg
from emmito.io import EmmitoError


def minimal() -> dict:
    return {"volumes": {"v": {"images": "slices/"}}}


def test_defaults_are_filled_from_the_schema():
    config = cfg.validate(minimal())
    assert config["infer"]["chunk_slices"] == 20
    assert config["merge"]["block_slices"] == 200
    assert config["segment"]["seed_threshold"] == 150
    assert config["volumes"]["v"]["label_format"] == "binary"
    # defaults are copied, never shared between configs
    config["segment"]["min_size"] = 1
    assert cfg.validate(minimal())["segment"]["min_size"] == 1000


def test_repo_configs_are_valid():
    from tinyproject import REPO

    for path in [REPO / "config.yaml", *sorted((REPO / "configs").glob("*.yaml"))]:
        cfg.load(path)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "change, words",
    [
        ({"segment": {"min_sise": 5}}, ["unknown key 'min_sise'", "segment", "check the spelling"]),
        ({"segment": {"seed_threshold": 300}}, ["segment.seed_threshold", "<= 255"]),
        ({"infer": {"chunk_slices": "twenty"}}, ["infer.chunk_slices", "not of type"]),
        ({"segment": {"decoder": "magic"}}, ["segment.decoder", "use one of"]),
        ({"infer": {"chunk_slices": 20}, "merge": {"block_slices": 50}}, ["block_slices (50)", "multiple of infer.chunk_slices (20)"]),
        ({"train": {"volumes": ["nope"]}}, ["train.volumes", "'nope'"]),
        ({"train": {"volumes": ["v"]}}, ["volumes.v.labels"]),
    ],
)
def test_bad_config_is_one_line(change, words):
    config = minimal()
    config.update(change)
    with pytest.raises(EmmitoError) as info:
        cfg.validate(config, source="my.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("my.yaml: ")
    for word in words:
        assert word in message, message


@pytest.mark.bad_input
def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("volumes:\n  v: {images: [unclosed\n")
    with pytest.raises(EmmitoError, match=r"c.yaml: line \d+ not valid YAML"):
        cfg.load(path)


def test_with_defaults_checks_one_section():
    assert cfg.with_defaults("segment", {"min_size": 5})["min_size"] == 5
    with pytest.raises(EmmitoError, match="unknown key"):
        cfg.with_defaults("segment", {"min_sise": 5})


def test_load_roundtrip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    assert cfg.load(path)["model"]["norm"] == "group"
