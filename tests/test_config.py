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


# ---- what the user set, told from the defaults -----------------------------------------


def test_explicit_keys_are_dotted_paths_at_every_depth():
    raw = {"segment": {"min_size": 5}, "train": {"discriminative": {"support_voxels": 64}, "volumes": ["v"]}}
    assert cfg.explicit_keys(raw) == {
        "segment",
        "segment.min_size",
        "train",
        "train.discriminative",
        "train.discriminative.support_voxels",
        "train.volumes",
    }
    assert cfg.explicit_keys({}) == frozenset()


def test_validate_records_the_keys_set_before_defaults_are_filled():
    config = minimal()
    config["train"] = {"discriminative": {"support_voxels": 64}}
    config["segment"] = {"min_size": 5}
    validated = cfg.validate(config)
    assert isinstance(validated, cfg.Validated) and isinstance(validated, dict)
    # a user's value, and a default filled beside it
    assert validated["segment"]["min_size"] == 5 and validated.is_explicit("segment.min_size")
    assert validated["segment"]["seed_threshold"] == 150 and not validated.is_explicit("segment.seed_threshold")
    assert validated["train"]["discriminative"]["support_voxels"] == 64
    assert "train.discriminative.support_voxels" in validated.explicit
    assert validated["train"]["discriminative"]["delta_var"] == 0.5
    assert "train.discriminative.delta_var" not in validated.explicit
    # a whole section of defaults is not the user's
    assert validated["merge"]["block_slices"] == 200 and "merge" not in validated.explicit
    assert "volumes.v.images" in validated.explicit and "volumes.v.label_format" not in validated.explicit


def test_validated_config_serialises_and_copies_like_a_dict():
    import copy
    import json
    import pickle

    validated = cfg.validate(minimal())
    assert json.loads(json.dumps(validated)) == dict(validated)
    for twin in (copy.deepcopy(validated), pickle.loads(pickle.dumps(validated))):
        assert twin == validated and twin.explicit == validated.explicit


def test_load_records_what_the_file_sets(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**minimal(), "infer": {"chunk_slices": 10}, "train": {"discriminative": {"gamma": 0.5}}}))
    config = cfg.load(path)
    assert config["infer"]["chunk_slices"] == 10 and "infer.chunk_slices" in config.explicit
    assert config["infer"]["batch_size"] and "infer.batch_size" not in config.explicit
    assert "train.discriminative.gamma" in config.explicit
    assert "train.discriminative.support_voxels" not in config.explicit


def test_validate_sections_needs_no_volumes_and_fills_every_section():
    sections = cfg.validate_sections({"segment": {"min_size": 5}}, source="--params")
    assert "volumes" not in sections
    assert sections["segment"]["min_size"] == 5 and sections["merge"]["block_slices"] == 200
    assert sections.explicit == {"segment", "segment.min_size"}
    # the same messages as a whole config
    with pytest.raises(EmmitoError, match=r"^--params: unknown key 'min_sise' in 'segment': check the spelling"):
        cfg.validate_sections({"segment": {"min_sise": 5}}, source="--params")
    with pytest.raises(EmmitoError, match=r"^--params: unknown key 'chunk_slices' in the top level"):
        cfg.validate_sections({"chunk_slices": 20}, source="--params")
    # the cross-key rules are the whole config's (validate), not the sections'
    assert cfg.validate_sections({"merge": {"block_slices": 50}})["merge"]["block_slices"] == 50


def test_revalidating_keeps_what_the_user_set():
    """A benchmark edits a loaded config and validates it again: the user's keys are still the user's."""
    validated = cfg.validate({**minimal(), "segment": {"min_size": 5}})
    validated["infer"]["tta"] = 1
    again = cfg.validate(validated)
    assert again.explicit == validated.explicit and "infer.tta" not in again.explicit


def test_model_paths_follow_the_results_layout():
    from emmito import contract

    assert cfg.model_dir({"model": {"name": "m1"}}) == contract.Results().model_dir("m1")
    assert cfg.model_dir({}) == contract.Results().model_dir("model")
    assert cfg.support_set_path({"model": {"name": "m1"}}) == contract.Results().support_set("m1")
    assert cfg.support_set_path({"segment": {"support_set": "elsewhere.npz"}}) == "elsewhere.npz"
