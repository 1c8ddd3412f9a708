"""The config schema: defaults, typos, ranges and the cross-key rules."""

from __future__ import annotations

import pytest
import yaml

import emmito
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


# ---- what reruns: each stage's params from the schema's x-stages ---------------------------


def annotated_config():
    """A whole config with keys of every kind set: output keys, runtime keys, a workflow key."""
    return cfg.validate({
        **minimal(),
        "seed": 3,
        "model": {"filters": [4, 8], cfg.contract.DOWNSAMPLE_XY: 2},
        "train": {"iterations": 7, "threads": 2},
        "infer": {"volumes": ["v"], "tta": 4, "batch_size": 8},
        "segment": {"min_size": 5, "threads": 1},
    })


def test_every_section_names_the_stages_its_keys_change():
    from emmito import contract

    properties = cfg.schema()["properties"]
    missing = [name for name, node in properties.items() if cfg.STAGES_KEY not in node]
    assert not missing, f"sections without x-stages: {missing}"

    def walk(node, path):
        stages = node.get(cfg.STAGES_KEY)
        if stages is not None:
            unknown = set(stages) - set(contract.OUTPUT_VERSIONS)
            assert not unknown, f"{path}: x-stages names unknown stage(s) {sorted(unknown)}"
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}" if path else key)

    walk(cfg.schema(), "")


def test_which_stages_a_key_changes():
    assert cfg.key_stages("seed") == ["train"]
    assert cfg.key_stages("model.filters") == ["train", "infer"]
    assert cfg.key_stages(f"model.{cfg.contract.DOWNSAMPLE_XY}") == ["train", "infer"]
    assert cfg.key_stages("train.discriminative.delta_var") == ["train"]
    assert cfg.key_stages("infer.tta") == cfg.key_stages("infer.tile_overlap") == ["infer"]
    assert cfg.key_stages("infer.chunk_slices") == ["infer", "merge"]
    assert cfg.key_stages("merge.block_overlap") == ["merge", "trace"]
    for runtime in ("train.threads", "train.workers", "infer.batch_size", "infer.prefetch_batches", "infer.threads",
                    "segment.threads", "upsample.slab_slices", "evaluate.slab_slices", "infer.volumes"):
        assert cfg.key_stages(runtime) == [], runtime
    with pytest.raises(KeyError):
        cfg.key_stages("segment.min_sise")


def test_stage_params_hold_exactly_the_keys_that_change_the_stage_output():
    from emmito import contract

    config = annotated_config()
    train = cfg.stage_params(config, "train")
    assert set(train) == {"seed", "model", "train", cfg.PARAMS_VERSION, cfg.PARAMS_EXPLICIT}  # no infer, no segment
    assert train["seed"] == 3 and train["model"]["filters"] == [4, 8] and train["model"][contract.DOWNSAMPLE_XY] == 2
    assert train["train"]["iterations"] == 7 and train["train"]["learning_rate"] == 0.002
    assert {"threads", "workers", "save_every", "tensorboard"}.isdisjoint(train["train"])
    assert train["model"] == {k: v for k, v in config["model"].items()}  # every model key, defaults included

    infer = cfg.stage_params(config, "infer")
    assert infer["infer"] == {
        "chunk_slices": 20, "tile": "auto", "tile_overlap": [0, 0, 0], "tile_crop": [2, 16, 16], "tile_memory_mb": 2048,
        "blend_sigma": 0.125, "tta": 4, "uncertainty": "none",
    }  # not chunks_per_job: jobs of any size write the same heat files
    assert infer["model"]["patch"] == [16, 128, 128] and "seed" not in infer and "train" not in infer

    assert {k: v for k, v in cfg.stage_params(config, "merge").items() if k not in (cfg.PARAMS_VERSION, cfg.PARAMS_EXPLICIT)} == {
        "infer": {"chunk_slices": 20}, "merge": {"block_slices": 200, "block_overlap": 4},
    }
    segment = cfg.stage_params(config, "segment")
    assert set(segment) == {"segment", cfg.PARAMS_VERSION, cfg.PARAMS_EXPLICIT}
    assert segment["segment"]["min_size"] == 5 and segment["segment"]["foreground_threshold"] == 16
    assert "threads" not in segment["segment"]
    trace = cfg.stage_params(config, "trace")
    assert trace["merge"] == config["merge"] and trace["trace"] == {"criterion": "iou", "threshold": 0.5}
    assert cfg.stage_params(config, "upsample")["upsample"] == {"pyramid_levels": 2}
    assert cfg.stage_params(config, "evaluate")["evaluate"] == {"iou_threshold": 0.5}
    # export.ome_zarr / export.tiff only add rules: the workflow reads them, no stage's output changes
    assert cfg.stage_params(config, "export")["export"] == {
        k: v for k, v in config["export"].items() if k not in ("ome_zarr", "tiff")
    }
    assert cfg.stage_params(config, "convert")["volumes"] == config["volumes"]
    for stage, version in contract.OUTPUT_VERSIONS.items():
        params = cfg.stage_params(config, stage)
        assert params[cfg.PARAMS_VERSION] == version
        assert "emmito_version" not in json_text(params) and f'"{emmito.__version__}"' not in json_text(params)
    with pytest.raises(ValueError, match="unknown stage 'sgement'"):
        cfg.stage_params(config, "sgement")


def json_text(value) -> str:
    import json

    return json.dumps(value, sort_keys=True)


def test_stage_params_list_the_values_the_user_set():
    config = annotated_config()
    assert cfg.stage_params(config, "segment")[cfg.PARAMS_EXPLICIT] == ["segment.min_size"]  # not segment.threads, not "segment"
    assert cfg.stage_params(config, "infer")[cfg.PARAMS_EXPLICIT] == sorted(
        ["infer.tta", "model.filters", f"model.{cfg.contract.DOWNSAMPLE_XY}"]
    )  # not infer.batch_size (runtime), not infer.volumes (the workflow's)
    assert cfg.stage_params(config, "merge")[cfg.PARAMS_EXPLICIT] == []
    assert cfg.stage_params(config, "train")[cfg.PARAMS_EXPLICIT] == sorted(
        ["seed", "model.filters", f"model.{cfg.contract.DOWNSAMPLE_XY}", "train.iterations"]
    )
    # a plain dict knows no user keys
    assert cfg.stage_params(dict(config), "segment")[cfg.PARAMS_EXPLICIT] == []


def test_runtime_params_hold_the_keys_a_stage_reads_that_change_no_output():
    config = annotated_config()
    assert cfg.runtime_params(config, "infer") == {
        "infer": {"batch_size": 8, "prefetch_batches": 2, "threads": 0}, cfg.PARAMS_EXPLICIT: ["infer.batch_size"],
    }  # infer.volumes is the workflow's: in neither
    assert cfg.runtime_params(config, "train")["train"] == {"threads": 2, "workers": 1, "save_every": 100, "tensorboard": False}
    assert cfg.runtime_params(config, "segment") == {"segment": {"threads": 1}, cfg.PARAMS_EXPLICIT: ["segment.threads"]}
    assert cfg.runtime_params(config, "upsample")["upsample"] == {"slab_slices": 8}
    assert cfg.runtime_params(config, "merge") == {cfg.PARAMS_EXPLICIT: []}


CHANGES = [  # (a change to a whole config, the stages whose params it changes)
    ({"segment": {"min_size": 6}}, {"segment"}),  # a key tune chooses: tune's result does not depend on it
    ({"segment": {"blur_sigma": 0.5}}, {"segment", "tune"}),  # a key tune works under
    ({"trace": {"threshold": 0.6}}, {"trace"}),
    ({"merge": {"block_overlap": 3}}, {"merge", "trace"}),
    ({"infer": {"tta": 8}}, {"infer"}),
    ({"infer": {"tile_overlap": 0.25}}, {"infer"}),
    ({"infer": {"chunk_slices": 10}}, {"infer", "merge"}),
    ({"infer": {"volumes": ["v", "w"]}}, set()),
    ({"evaluate": {"iou_threshold": 0.6}}, {"evaluate"}),
    ({"upsample": {"pyramid_levels": 3}}, {"upsample"}),
    ({"export": {"image_encoding": "jpeg"}}, {"export"}),
    ({"infer": {"batch_size": 2, "prefetch_batches": 4, "threads": 3}}, set()),
    ({"train": {"threads": 1, "workers": 3, "save_every": 5}, "segment": {"threads": 4}}, set()),
    ({"upsample": {"slab_slices": 2}, "evaluate": {"slab_slices": 2}}, set()),
    ({"model": {"norm": "batch"}}, {"train", "infer"}),
    ({"model": {cfg.contract.DOWNSAMPLE_XY: 4}}, {"train", "infer"}),
    ({"train": {"learning_rate": 0.001}}, {"train"}),
    ({"seed": 4}, {"train"}),
    ({"suggest": {"rows_per_kind": 5}}, {"suggest"}),
    ({"suggest": {"region": [10, 128, 128], "outlier_z": 2.5}}, {"suggest"}),
]


@pytest.mark.parametrize("change, stages", CHANGES, ids=[json_text(c) for c, _ in CHANGES])
def test_a_change_changes_the_params_of_exactly_the_stages_it_affects(change, stages):
    """The rerun matrix at the config level: the workflow test (tests/workflow/test_rerun.py) checks the jobs."""
    from emmito import contract
    from tinyproject import merged

    raw = {"volumes": {"v": {"images": "slices/"}, "w": {"images": "more/"}}, "seed": 3, "infer": {"volumes": ["v"], "tta": 4}}
    before = cfg.validate(merged(raw, {}))
    after = cfg.validate(merged(raw, change))
    changed = {s for s in contract.OUTPUT_VERSIONS if cfg.stage_params(before, s) != cfg.stage_params(after, s)}
    assert changed == stages, changed


@pytest.mark.bad_input
def test_the_moved_downsample_key_gets_one_line(tmp_path):
    old = {**minimal(), "infer": {cfg.contract.DOWNSAMPLE_XY: 2}}
    with pytest.raises(EmmitoError) as info:
        cfg.validate(old, source="old.yaml")
    assert str(info.value) == "old.yaml: infer.downsample_xy is now model.downsample_xy: move it"
    with pytest.raises(EmmitoError, match=r"^--params: infer.downsample_xy is now model.downsample_xy: move it$"):
        cfg.validate_sections({"infer": {cfg.contract.DOWNSAMPLE_XY: 2}}, source="--params")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(EmmitoError, match="c.yaml: infer.downsample_xy is now model.downsample_xy"):
        cfg.load(path)
    assert cfg.validate({**minimal(), "model": {cfg.contract.DOWNSAMPLE_XY: 2}})["model"][cfg.contract.DOWNSAMPLE_XY] == 2


def test_a_stage_params_validate_as_sections():
    """What a rule passes as --params validates alone: the sections it lacks are filled with defaults."""
    config = annotated_config()
    for stage in cfg.contract.OUTPUT_VERSIONS:
        params = {k: v for k, v in cfg.stage_params(config, stage).items() if k not in (cfg.PARAMS_VERSION, cfg.PARAMS_EXPLICIT)}
        params.pop("volumes", None)
        sections = cfg.validate_sections(params)
        assert sections["segment"]["seed_threshold"] == 150
