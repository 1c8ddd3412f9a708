"""tune: the decoder's settings chosen on labelled volumes (tuning.tune), written beside the checkpoint (emmito tune)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from emmito import __version__, cli, config, contract, synth, tuning
from emmito.config import section_defaults
from emmito.decoders import decode
from emmito.embedding import embedding_channel_names, embeddings_to_heat
from emmito.io import EmmitoError
from emmito.metrics import evaluate_arrays
from emmito.model import build_model
from emmito.targets import binary_target, skeleton_distance_target

SEGMENT = {**section_defaults("segment"), "threads": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_like_heat(labels: np.ndarray, seed: int) -> np.ndarray:
    """A binary model's heat of ``labels``: its target blurred in-plane (soft borders) with smooth noise."""
    rng = np.random.default_rng(seed)
    soft = ndimage.gaussian_filter(binary_target(labels).astype(np.float32), sigma=(0, 1.5, 1.5))
    noise = ndimage.gaussian_filter(rng.standard_normal(labels.shape).astype(np.float32), (0, 2, 2))
    logit = 8.0 * (soft - 0.5) + 3.0 * noise
    return np.rint(255.0 / (1.0 + np.exp(-logit))).astype(np.uint8)


def synthetic(name: str, seed: int, slices: int = 24, size: int = 128) -> tuning.TuneVolume:
    """A synthetic volume's labels (emmito synth, as the demo's) and a binary model's heat of them."""
    _, labels = synth.synthesize(slices, size, seed)
    return tuning.TuneVolume(name, {"foreground": model_like_heat(labels, seed)}, labels, (0, slices))


@pytest.fixture(scope="module")
def binary_pair() -> tuple[tuning.TuneVolume, tuning.TuneVolume]:
    return synthetic("a", 5), synthetic("held_out", 6)


def test_a_binary_model_is_tuned_on_probabilities_and_beats_the_hand_set_128_on_a_held_out_volume(binary_pair, capsys):
    tune_on, held_out = binary_pair
    tuned = tuning.tune([tune_on], SEGMENT)
    assert tuned.decoder == "heat_watershed" and tuned.heat == tuning.PROBABILITY
    assert set(tuned.settings) == {"foreground_threshold", "seed_threshold", "min_size"}
    assert tuned.grid["foreground_threshold"] == [64, 96, 128, 160, 192]  # probabilities 0.25 .. 0.75, never 16/255
    assert 64 <= tuned.settings["foreground_threshold"] <= 192
    assert tuned.settings["seed_threshold"] >= tuned.settings["foreground_threshold"]
    assert tuned.untuned["settings"]["foreground_threshold"] == tuning.PROBABILITY_FOREGROUND_THRESHOLD
    assert tuned.chosen["score"] >= tuned.untuned["score"]
    scores = {}
    for name, settings in (("tuned", tuned.settings), ("hand-set 128", {"foreground_threshold": 128}), ("schema 16", {})):
        scores[name] = evaluate_arrays(decode(held_out.channels, {**SEGMENT, **settings}), held_out.labels)["instance_f1"]
    with capsys.disabled():
        print(f"\nheld-out instance F1: tuned {tuned.settings} {scores['tuned']:.3f}, "
              f"hand-set 128 {scores['hand-set 128']:.3f}, schema defaults {scores['schema 16']:.3f}")
    # Measured: tuned 1.000 (128 / 240 / 280), hand-set 128 0.769 (its min_size 1000 drops small objects), defaults 0.773.
    assert scores["tuned"] >= scores["hand-set 128"]
    assert scores["tuned"] >= 0.9


def test_tuning_is_deterministic_and_its_record_is_json(binary_pair):
    first = tuning.tune([binary_pair[0]], SEGMENT).record()
    second = tuning.tune([binary_pair[0]], SEGMENT).record()
    assert first == second
    assert json.loads(json.dumps(first)) == first
    assert first["volumes"][0]["name"] == "a" and first["volumes"][0]["slices"] == [0, 24]
    assert len(first["trials"]) == tuning.grid_size("heat_watershed", tuning.PROBABILITY, tuning.median_object_size([binary_pair[0].labels]))[1]
    assert 10 <= len(first["trials"]) <= 100  # tens of points


def test_a_skeleton_distance_model_is_tuned_on_low_values():
    _, labels = synth.synthesize(16, 96, 3)
    heat = np.rint((skeleton_distance_target(labels) + 1.0) / 2.0 * 255.0).astype(np.uint8)
    volume = tuning.TuneVolume("skel", {"skeleton_distance": heat}, labels, (0, 16))
    tuned = tuning.tune([volume], SEGMENT)
    assert tuned.heat == tuning.SKELETON and tuned.decoder == "heat_watershed"
    assert max(tuned.grid["foreground_threshold"]) <= 96 and 16 in tuned.grid["foreground_threshold"]
    assert tuned.settings["foreground_threshold"] <= 96
    assert tuned.untuned["settings"]["foreground_threshold"] == 16  # the schema's: it suits this heatmap


@pytest.mark.parametrize("decoder", ["heat_watershed", "bc_watershed"])
def test_the_size_post_filter_equals_decoding_with_that_minimum_size(decoder):
    volume = synthetic("v", 8, slices=12, size=96)
    labels = volume.labels
    channels = dict(volume.channels)
    if decoder == "bc_watershed":
        channels["contour"] = np.where(binary_target(labels) != (labels > 0), 255, 0).astype(np.uint8)
    section = {**SEGMENT, "max_area_2d": 400}
    size_key = tuning.SIZE_KEYS[decoder]
    unfiltered = decode(channels, {**section, size_key: 0, "max_area_2d": 0})
    for size in (0, 30, 200, 1000):
        expected = decode(channels, {**section, size_key: size})
        from emmito.labels import drop_wide_objects

        assert np.array_equal(drop_wide_objects(tuning.size_filter(unfiltered, size), 400), expected)


def test_bc_watershed_tunes_its_own_keys():
    _, labels = synth.synthesize(12, 96, 4)
    foreground = model_like_heat(labels, 4)
    edges = ndimage.binary_dilation((labels > 0) & ~ndimage.binary_erosion(labels > 0, iterations=1), iterations=1)
    contour = np.rint(ndimage.gaussian_filter(edges.astype(np.float32), (0, 1, 1)) * 255).astype(np.uint8)
    volume = tuning.TuneVolume("bc", {"foreground": foreground, "contour": contour}, labels, (0, 12))
    tuned = tuning.tune([volume], SEGMENT)
    assert tuned.decoder == "bc_watershed"
    assert set(tuned.settings) == set(tuning.TUNED_KEYS["bc_watershed"])
    assert tuned.settings["bc_foreground"] in (96, 128, 160, 192, 216)
    assert tuned.settings["bc_seed_foreground"] >= tuned.settings["bc_foreground"]
    assert tuned.chosen["instance_f1"] > 0.5


def embedding_volume() -> tuple[tuning.TuneVolume, np.ndarray]:
    """Two touching boxes whose embeddings differ (3-d, with noise), a clean foreground heat; and the embeddings."""
    labels = np.zeros((4, 24, 40), np.uint32)
    labels[:, 4:20, 4:18], labels[:, 4:20, 18:36] = 1, 2
    rng = np.random.default_rng(0)
    emb = rng.normal(0, 0.2, (3, *labels.shape))
    for value, mean in {1: np.array([2.0, 0.0, 0.0]), 2: np.array([-2.0, 0.0, 0.0])}.items():
        emb[:, labels == value] += mean[:, None]
    heat = np.where(labels > 0, 220, 30).astype(np.uint8)
    channels = {"foreground": heat} | {name: embeddings_to_heat(emb[i]) for i, name in enumerate(embedding_channel_names(3))}
    return tuning.TuneVolume("emb", channels, labels, (0, 4)), emb


def test_embedding_cluster_tunes_the_foreground_threshold_and_min_size():
    volume, _ = embedding_volume()
    tuned = tuning.tune([volume], {**SEGMENT, "decoder": "embedding_cluster", "embedding_sample": 300})
    assert tuned.decoder == "embedding_cluster"
    assert set(tuned.settings) == {"embedding_foreground", "embedding_min_size"}
    assert tuned.chosen["instance_f1"] == 1.0


def test_nearest_neighbour_tunes_the_vote_share_and_min_size_with_the_support_set():
    from emmito.embedding import build_support_set, heat_to_embeddings

    volume, _ = embedding_volume()
    embeddings = np.stack([heat_to_embeddings(volume.channels[f"emb{i}"]) for i in range(3)])
    support = build_support_set(embeddings, (volume.labels > 0).astype(np.int64), 400, seed=1)
    section = {**SEGMENT, "decoder": "nearest_neighbour", "embedding_sample": 300, "nnc_candidates": 0}
    tuned = tuning.tune([volume], section, support=support)
    assert tuned.decoder == "nearest_neighbour"
    assert set(tuned.settings) == {"nnc_threshold", "embedding_min_size"}
    assert tuned.grid["nnc_threshold"] == [0.3, 0.4, 0.5, 0.6, 0.7]
    assert tuned.chosen["instance_f1"] == 1.0


def test_ties_go_to_the_higher_f1_then_to_the_untuned_settings():
    untuned = {"foreground_threshold": 128, "seed_threshold": 150, "min_size": 1000}

    def trial(fg: int, seed: int, size: int, score: float, f1: float) -> dict:
        return {"settings": {"foreground_threshold": fg, "seed_threshold": seed, "min_size": size}, "score": score, "instance_f1": f1}

    trials = [trial(64, 160, 0, 0.8, 0.9), trial(192, 200, 500, 0.8, 0.9), trial(128, 160, 1000, 0.8, 0.9), trial(160, 160, 0, 0.7, 1.0)]
    assert tuning._chosen(trials, untuned) == 2
    trials[1]["instance_f1"] = 0.95
    assert tuning._chosen(trials, untuned) == 1


def test_the_keys_tune_chooses_do_not_rerun_it_and_the_others_do():
    """x-stages: a tuned key (its value is the tune's choice or the user's) changes segment only; the keys tuning
    decodes under (blur, seed sizes, max_area_2d, the decoder) change tune's output too; threads change nothing."""
    segment_keys = section_defaults("segment")
    for key in segment_keys:
        stages = config.key_stages(f"segment.{key}")
        if key in tuning.ALL_TUNED_KEYS:
            assert stages == ["segment"], key
        elif key == "threads":
            assert stages == [], key
        else:
            assert sorted(stages) == ["segment", "tune"], key
    assert set(tuning.ALL_TUNED_KEYS) <= set(segment_keys)


def test_central_slices_bound_the_work():
    assert tuning.central_slices(100, 0) == (0, 100)
    assert tuning.central_slices(100, 200) == (0, 100)
    assert tuning.central_slices(100, 20) == (40, 60)


def test_no_volume_is_one_line():
    with pytest.raises(EmmitoError, match="tuning needs at least one labelled volume"):
        tuning.tune([], SEGMENT)


# ---- what segment runs with ----------------------------------------------------------------


def test_settings_defaults_then_decoder_json_then_the_users_keys():
    record = {"decoder": "heat_watershed", "settings": {"foreground_threshold": 96, "seed_threshold": 200, "min_size": 300}}
    section = {**SEGMENT, "min_size": 50}
    settings, sources = tuning.resolve_settings(section, {"segment.min_size"}, record, "heat_watershed", tuning.PROBABILITY)
    assert (settings["foreground_threshold"], settings["seed_threshold"], settings["min_size"]) == (96, 200, 50)
    assert sources == {"foreground_threshold": "decoder.json", "seed_threshold": "decoder.json", "min_size": "config"}
    assert "foreground_threshold 96 (decoder.json)" in tuning.describe(settings, sources)
    # Nothing tuned: a probability heatmap gets probability 0.5, a skeleton-distance one the schema's 16.
    settings, sources = tuning.resolve_settings(SEGMENT, set(), None, "heat_watershed", tuning.PROBABILITY)
    assert settings["foreground_threshold"] == 128 and sources["foreground_threshold"] == "default"
    assert tuning.resolve_settings(SEGMENT, set(), None, "heat_watershed", tuning.SKELETON)[0]["foreground_threshold"] == 16
    # Settings tuned for another decoder are not used.
    settings, sources = tuning.resolve_settings(SEGMENT, set(), record, "bc_watershed", tuning.PROBABILITY)
    assert settings["bc_foreground"] == SEGMENT["bc_foreground"] and "decoder.json" not in sources.values()


def test_a_bad_value_in_decoder_json_is_one_line():
    record = {"decoder": "heat_watershed", "settings": {"foreground_threshold": 900}}
    with pytest.raises(EmmitoError, match=r"^tuned/decoder.json: .*foreground_threshold.*rerun the tune rule"):
        tuning.resolve_settings(SEGMENT, set(), record, "heat_watershed", tuning.PROBABILITY, source="tuned/decoder.json")


# ---- the decoder.json file ----------------------------------------------------------------


def test_decoder_settings_round_trip_and_bad_files_are_one_line(tmp_path):
    path = tmp_path / "model" / "decoder.json"
    contract.save_decoder_settings(path, {"decoder": "heat_watershed", "settings": {"min_size": 3}})
    loaded = contract.load_decoder_settings(path)
    assert loaded["settings"] == {"min_size": 3} and loaded["format"] == contract.DECODER_SETTINGS_FORMAT
    assert [p.name for p in path.parent.iterdir()] == ["decoder.json"]  # atomic: no temporary left
    with pytest.raises(EmmitoError, match=r"none.json: decoder settings not found"):
        contract.load_decoder_settings(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EmmitoError, match=r"bad.json: not readable decoder settings .*rerun the tune rule"):
        contract.load_decoder_settings(tmp_path / "bad.json")
    (tmp_path / "new.json").write_text(json.dumps({"format": 99, "decoder": "x", "settings": {}}))
    with pytest.raises(EmmitoError, match=r"new.json: decoder settings format 99 .*upgrade emmito"):
        contract.load_decoder_settings(tmp_path / "new.json")
    assert contract.Results().decoder_settings("demo") == "results/model/demo/decoder.json"
    assert contract.decoder_settings_beside("elsewhere/m/checkpoint.pt") == "elsewhere/m/decoder.json"


# ---- emmito tune ------------------------------------------------------------------------------

TINY = dict(filters=[2, 4], conv3d_from_level=0, pool_z_from_level=0, patch=[4, 16, 16])


def write_checkpoint(path, factor: int = 1) -> None:
    """A tiny random binary model: its heat is arbitrary, but tune runs on it as on a trained one."""
    torch.manual_seed(0)
    model_cfg = {**section_defaults("model"), **TINY, contract.DOWNSAMPLE_XY: factor}
    model = build_model(model_cfg)
    contract.save_checkpoint(path, {
        "model_config": model_cfg, "state_dict": model.state_dict(), "target": "binary", "channels": ["foreground"],
        contract.CHECKPOINT_DOWNSAMPLE_XY: factor, "input_norm": {"mean": 127.5, "std": 127.5},
        "iteration": 7, "emmito_version": __version__,
    })


def test_tune_cli_writes_decoder_json_beside_the_checkpoint(tmp_path, capsys):
    image, labels = synth.synthesize(12, 48, 1)
    contract.fixture(tmp_path / "image.h5", "image", image)
    contract.fixture(tmp_path / "label.h5", "label", labels)
    write_checkpoint(tmp_path / "checkpoint.pt")
    out = tmp_path / "decoder.json"
    status = cli.main([
        "tune", str(tmp_path / "checkpoint.pt"), str(out), "--volume", "val", str(tmp_path / "image.h5"), str(tmp_path / "label.h5"),
        "--params", json.dumps({"tune": {"max_slices": 8}, "infer": {"batch_size": 8}}),
    ])
    assert status == 0, capsys.readouterr().err
    record = contract.load_decoder_settings(out)
    assert record["decoder"] == "heat_watershed" and record["target"] == "binary" and record["checkpoint_iteration"] == 7
    assert set(record["settings"]) == {"foreground_threshold", "seed_threshold", "min_size"}
    assert record["settings"]["foreground_threshold"] in (64, 96, 128, 160, 192)
    assert record["volumes"][0]["name"] == "val" and record["volumes"][0]["slices"] == [2, 10]  # the central 8 of 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "decoder.json", "image.h5", "label.h5"]
    assert "emmito tune: heat_watershed on val: foreground_threshold" in capsys.readouterr().err


@pytest.mark.bad_input
def test_tune_cli_refuses_labels_that_do_not_cover_the_image(tmp_path, capsys):
    image, labels = synth.synthesize(6, 32, 1)
    contract.fixture(tmp_path / "image.h5", "image", image)
    contract.fixture(tmp_path / "label.h5", "label", labels[:4])
    write_checkpoint(tmp_path / "checkpoint.pt")
    status = cli.main(["tune", str(tmp_path / "checkpoint.pt"), str(tmp_path / "decoder.json"),
                       "--volume", "v", str(tmp_path / "image.h5"), str(tmp_path / "label.h5")])
    err = capsys.readouterr().err
    assert status == 2 and "label.h5 is 4x32x32 but" in err and "reconvert the pair" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "decoder.json").exists()
