"""Embedding heads: discriminative loss, mean-shift decoder, nearest-neighbour classification (issue 9)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from emmito import cli, contract
from emmito.config import section_defaults
from emmito.contract import load_support_set, save_support_set
from emmito.decoders import decode, mean_shift_modes, nearest_neighbour_classify, nearest_neighbour_features
from emmito.embedding import build_support_set, embedding_channel_names, embeddings_to_heat, heat_to_embeddings
from emmito.io import read_volume
from emmito.losses import discriminative_loss

# ---- discriminative loss -------------------------------------------------------------


def constant_embeddings(instances: np.ndarray, centres: dict[int, tuple[float, ...]], dim: int) -> torch.Tensor:
    """float32 (1, E, z, y, x): every voxel of instance i at centres[i]; background at a far, odd place."""
    emb = np.full((dim, *instances.shape), 7.0, dtype=np.float32)
    for instance, centre in centres.items():
        emb[:, instances == instance] = np.asarray(centre, dtype=np.float32)[:, None]
    return torch.from_numpy(emb)[None]


def two_instances() -> np.ndarray:
    instances = np.zeros((2, 4, 4), dtype=np.int64)
    instances[:, :2, :2] = 1
    instances[:, 2:, 2:] = 5  # ids need not be consecutive
    return instances


def test_loss_is_zero_for_perfectly_clustered_embeddings():
    instances = two_instances()
    # Means 4 apart (> 2 * delta_dist = 3), every voxel on its mean.
    emb = constant_embeddings(instances, {1: (2.0, 0.0), 5: (-2.0, 0.0)}, dim=2).requires_grad_()
    total, terms = discriminative_loss(emb, torch.from_numpy(instances)[None])
    terms = {name: value.detach() for name, value in terms.items()}
    assert float(terms["var"]) == 0.0 and float(terms["dist"]) == 0.0
    assert float(terms["reg"]) == pytest.approx(2.0, abs=1e-5)
    assert float(total.detach()) == pytest.approx(1e-4 * 2.0, abs=1e-8)  # only the small regulariser
    total.backward()
    assert torch.isfinite(emb.grad).all()
    # Without the regulariser the loss is exactly zero.
    total, _ = discriminative_loss(emb.detach(), torch.from_numpy(instances)[None], gamma=0.0)
    assert float(total) == 0.0


def test_loss_is_positive_when_clusters_are_spread_or_close():
    instances = two_instances()
    close = constant_embeddings(instances, {1: (0.5, 0.0), 5: (-0.5, 0.0)}, dim=2)
    _, terms = discriminative_loss(close, torch.from_numpy(instances)[None])
    assert float(terms["dist"]) == pytest.approx((3.0 - 1.0) ** 2, abs=1e-5) and float(terms["var"]) == 0.0
    spread = constant_embeddings(instances, {1: (2.0, 0.0), 5: (-2.0, 0.0)}, dim=2)
    spread[0, 0, 0, 0, 0] += 3.0  # one voxel of instance 1 far from its mean
    total, terms = discriminative_loss(spread, torch.from_numpy(instances)[None])
    assert float(terms["var"]) > 0.0 and float(total) > float(terms["var"]) - 1e-9


def test_each_term_matches_a_hand_computation():
    # Four voxels: instance 1 at (0, 0) and (2, 0); instance 2 at (1, 1); background at (100, 100).
    emb = torch.tensor([[0.0, 2.0, 1.0, 100.0], [0.0, 0.0, 1.0, 100.0]]).reshape(1, 2, 1, 1, 4)
    instances = torch.tensor([1, 1, 2, 0]).reshape(1, 1, 1, 4)
    total, terms = discriminative_loss(emb, instances, delta_var=0.5, delta_dist=1.5, gamma=1e-4)
    # mu1 = (1, 0): both voxels 1 away, (1 - 0.5)^2 = 0.25 each -> 0.25; mu2 = (1, 1): 0. Mean: 0.125.
    assert float(terms["var"]) == pytest.approx(0.125, abs=1e-6)
    # ||mu1 - mu2|| = 1: (3 - 1)^2 = 4.
    assert float(terms["dist"]) == pytest.approx(4.0, abs=1e-6)
    # (||mu1|| + ||mu2||) / 2 = (1 + sqrt 2) / 2.
    reg = (1.0 + math.sqrt(2.0)) / 2.0
    assert float(terms["reg"]) == pytest.approx(reg, abs=1e-6)
    assert float(total) == pytest.approx(0.125 + 4.0 + 1e-4 * reg, abs=1e-6)
    # A second sample without instances counts as 0 in the batch mean.
    batch_emb = torch.cat([emb, torch.randn_like(emb)])
    batch_instances = torch.cat([instances, torch.zeros_like(instances)])
    batch_total, batch_terms = discriminative_loss(batch_emb, batch_instances)
    assert float(batch_terms["dist"]) == pytest.approx(2.0, abs=1e-6)
    assert float(batch_total) == pytest.approx(float(total) / 2, abs=1e-6)


def test_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        discriminative_loss(torch.zeros(1, 2, 3, 4, 4), torch.zeros(1, 3, 4, 5, dtype=torch.long))


# ---- clustering decoder ------------------------------------------------------------------


def touching_boxes(seed: int = 0, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings float32 (3, z, y, x), foreground bool, truth uint32): two boxes sharing a face, plus noise."""
    rng = np.random.default_rng(seed)
    shape = (6, 12, 20)
    truth = np.zeros(shape, dtype=np.uint32)
    truth[1:5, 2:10, 2:10] = 1
    truth[1:5, 2:10, 10:18] = 2  # touches object 1 along x = 9 | 10
    emb = rng.normal(0, noise, size=(3, *shape)).astype(np.float32)
    emb[:, truth == 1] += np.array([1.5, 0.0, 0.0], np.float32)[:, None]
    emb[:, truth == 2] += np.array([-1.0, 1.0, 0.0], np.float32)[:, None]
    return emb, truth > 0, truth


SMALL = {"embedding_min_size": 10, "embedding_sample": 500}


def embedding_cluster(embeddings: np.ndarray, foreground: np.ndarray, params: dict) -> np.ndarray:
    """The embedding_cluster decoder through ``decode``, on embeddings float32 (E, z, y, x) inside ``foreground`` bool.

    The embeddings go in as a heat file holds them (uint8, the default
    embedding range), the foreground as a 255/0 channel above the default
    ``embedding_foreground``; ``params`` completes the schema defaults.
    """
    channels = {"foreground": np.where(foreground, 255, 0).astype(np.uint8)}
    channels |= {name: embeddings_to_heat(embeddings[i]) for i, name in enumerate(embedding_channel_names(len(embeddings)))}
    return decode(channels, {**section_defaults("segment"), **params, "decoder": "embedding_cluster"})


def test_clustering_separates_two_touching_instances():
    emb, foreground, truth = touching_boxes()
    labels = embedding_cluster(emb, foreground, SMALL)
    assert labels.dtype == np.uint32 and labels.shape == truth.shape
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
    # One-to-one with the truth, voxel for voxel.
    for obj in (1, 2):
        assert len(np.unique(labels[truth == obj])) == 1
    assert labels[truth == 1][0] != labels[truth == 2][0]
    assert np.array_equal(labels == 0, truth == 0)
    # Deterministic (subsampled: sample < component size).
    assert np.array_equal(labels, embedding_cluster(emb, foreground, {**SMALL, "embedding_sample": 200}))
    assert np.array_equal(
        embedding_cluster(emb, foreground, {**SMALL, "embedding_sample": 200}),
        embedding_cluster(emb, foreground, {**SMALL, "embedding_sample": 200}),
    )


def test_clustering_splits_far_objects_with_equal_embeddings_and_drops_small_ones():
    shape = (4, 10, 30)
    emb = np.zeros((2, *shape), dtype=np.float32)
    foreground = np.zeros(shape, dtype=bool)
    foreground[:, 2:8, 2:8] = True  # 144 voxels
    foreground[:, 2:8, 20:26] = True  # same embedding, elsewhere: another object
    foreground[0, 0, 28] = True  # 1 voxel: removed
    labels = embedding_cluster(emb, foreground, SMALL)
    assert labels.max() == 2 and labels[0, 0, 28] == 0
    assert labels[0, 3, 3] == 1 and labels[0, 3, 22] == 2


def test_too_large_a_bandwidth_merges_the_two_instances():
    emb, foreground, _ = touching_boxes()
    labels = embedding_cluster(emb, foreground, {**SMALL, "embedding_bandwidth": 5.0})
    assert labels.max() == 1


def test_mean_shift_finds_three_modes_densest_first():
    rng = np.random.default_rng(1)
    centres = np.array([[0, 0], [4, 0], [0, 4]], np.float32)
    counts = [50, 120, 80]
    points = np.concatenate([c + rng.normal(0, 0.1, (n, 2)).astype(np.float32) for c, n in zip(centres, counts)])
    modes = mean_shift_modes(points, bandwidth=1.0)
    assert modes.shape == (3, 2)
    np.testing.assert_allclose(modes, centres[[1, 2, 0]], atol=0.05)


def test_a_cluster_no_start_reaches_is_found_by_the_next_round(monkeypatch):
    from emmito import decoders

    rng = np.random.default_rng(2)
    big = rng.normal(0, 0.1, (500, 2)).astype(np.float32)
    small = (np.array([5.0, 5.0]) + rng.normal(0, 0.1, (40, 2))).astype(np.float32)
    points = np.concatenate([big, small])
    monkeypatch.setattr(decoders, "MEAN_SHIFT_STARTS", 1)  # one start, in the big cluster
    assert len(decoders.mean_shift_modes(points, 1.0)) == 1
    clusters = decoders.cluster_features(points, 1.0, sample=1000, min_points=10)
    assert len(np.unique(clusters[:500])) == 1 and len(np.unique(clusters[500:])) == 1
    assert clusters[0] != clusters[-1]
    # Without a second round the stray points join the nearest mode.
    monkeypatch.setattr(decoders, "MEAN_SHIFT_ROUNDS", 1)
    assert len(np.unique(decoders.cluster_features(points, 1.0, sample=1000))) == 1


def test_decode_reads_embedding_channels_from_uint8_heat():
    emb, foreground, truth = touching_boxes()
    channels = {"foreground": np.where(foreground, 240, 5).astype(np.uint8)}
    channels |= {name: embeddings_to_heat(emb[i]) for i, name in enumerate(embedding_channel_names(3))}
    labels = decode(channels, {**section_defaults("segment"), **SMALL, "decoder": "embedding_cluster"})
    assert labels.max() == 2 and np.array_equal(labels > 0, truth > 0)


def test_heat_quantisation_round_trip_within_one_step():
    values = np.linspace(-9, 9, 1001, dtype=np.float32)
    back = heat_to_embeddings(embeddings_to_heat(values, 8.0), 8.0)
    inside = np.abs(values) <= 8
    assert np.abs(back[inside] - values[inside]).max() <= 8.0 / 255 + 1e-6
    assert back.min() == -8.0 and back.max() == 8.0


def test_heat_logits_wrapper_stores_embeddings_as_their_heat():
    from emmito.prediction import to_heat
    from emmito.model import ProbabilityLogits

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    values = torch.linspace(-5, 5, 41).reshape(1, 1, 1, 1, 41)
    out = torch.cat([values, values, -values], 1)  # 1 target logit, 2 embeddings
    wrapped = ProbabilityLogits(Fixed(), "binary", embedding_dim=2, embedding_range=4.0)(out)
    assert torch.equal(wrapped[:, 0], values[:, 0])  # the target logit passes unchanged
    heat = to_heat(torch.sigmoid(wrapped[:, 1:]).numpy())
    assert np.array_equal(heat[0, 0], embeddings_to_heat(values[0, 0].numpy(), 4.0))
    assert np.array_equal(heat[0, 1], embeddings_to_heat(-values[0, 0].numpy(), 4.0))


# ---- nearest-neighbour classification -----------------------------------------------------


def toy_classes(seed: int, shape=(4, 8, 8)) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 (2, z, y, x), classes int64): class 1 (a random half) near (3, 3), class 0 near the origin."""
    rng = np.random.default_rng(seed)
    classes = (rng.random(shape) < 0.3).astype(np.int64)
    emb = rng.normal(0, 0.5, size=(2, *shape)).astype(np.float32)
    emb += 3.0 * classes[None].astype(np.float32)
    return emb, classes


def test_support_set_is_balanced_and_deterministic():
    emb, classes = toy_classes(0)
    features, support_classes = build_support_set(emb, classes, n_voxels=40, seed=3)
    assert features.shape == (40, 2) and features.dtype == np.float32
    assert np.bincount(support_classes).tolist() == [20, 20]
    again, again_classes = build_support_set(emb, classes, n_voxels=40, seed=3)
    assert np.array_equal(features, again) and np.array_equal(support_classes, again_classes)
    # Every feature is the embedding of a voxel of its class.
    flat = emb.reshape(2, -1).T
    for feature, cls in zip(features, support_classes):
        row = np.flatnonzero((flat == feature).all(1))
        assert len(row) == 1 and classes.reshape(-1)[row[0]] == cls


def test_nearest_neighbour_classifies_toy_embeddings():
    support_emb, support_labels = toy_classes(0)
    features, classes = build_support_set(support_emb, support_labels, n_voxels=60, seed=0)
    emb, truth = toy_classes(1)
    probabilities, class_map = nearest_neighbour_classify(emb, features, classes, k=5, chunk_voxels=37)
    assert probabilities.shape == (2, *truth.shape)
    np.testing.assert_allclose(probabilities.sum(0), 1.0)
    assert (class_map == truth).mean() > 0.98
    # Chunking does not change the answer.
    whole, _ = nearest_neighbour_classify(emb, features, classes, k=5, chunk_voxels=10**6)
    assert np.array_equal(whole, probabilities)


def test_nearest_neighbour_votes_equal_brute_force_on_quantised_embeddings():
    """Quantised (heat-file) embeddings repeat; each distinct vector is classified once, exactly as brute force."""
    rng = np.random.default_rng(4)
    features = rng.normal(size=(50, 3)).astype(np.float32)
    classes = rng.integers(0, 3, size=50)
    query = heat_to_embeddings(embeddings_to_heat(rng.normal(size=(3, 500)).astype(np.float32))).T
    assert len(np.unique(query, axis=0)) < len(query)
    votes = nearest_neighbour_features(query, features, classes, k=4, chunk_voxels=7)
    distances = ((query[:, None, :].astype(np.float64) - features[None]) ** 2).sum(2)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :4]
    expected = np.stack([(classes[nearest] == c).sum(1) / 4 for c in range(3)], axis=1)
    np.testing.assert_array_equal(votes, expected.astype(np.float32))


def test_support_set_file_round_trip_and_missing_file(tmp_path):
    features = np.arange(12, dtype=np.float32).reshape(6, 2)
    classes = np.array([0, 1, 0, 1, 1, 0])
    path = tmp_path / "model" / "support.npz"
    save_support_set(path, features, classes, {"embedding_dim": 2})
    loaded_features, loaded_classes = load_support_set(path)
    assert np.array_equal(loaded_features, features) and np.array_equal(loaded_classes, classes)
    assert [p.name for p in path.parent.iterdir()] == ["support.npz"]  # no temporary left
    with pytest.raises(Exception, match="retrain"):
        load_support_set(tmp_path / "nope.npz")


# ---- segment CLI ----------------------------------------------------------------------


def write_embedding_heat(path, emb, foreground) -> None:
    heat = np.stack([np.where(foreground, 240, 5).astype(np.uint8)] + [embeddings_to_heat(e, 4.0) for e in emb])
    contract.fixture(path, "heat", heat, voxel_size=[40, 8, 8], volume_depth=6,
                     channels=["foreground", *embedding_channel_names(len(emb))], embedding_range=4.0)


def test_cli_embedding_cluster_and_nearest_neighbour(tmp_path):
    emb, foreground, truth = touching_boxes()
    heat_path = tmp_path / "heat" / "block_0.h5"
    write_embedding_heat(heat_path, emb, foreground)
    out = tmp_path / "seg" / "block_0.h5"
    params = '{"segment": {"decoder": "embedding_cluster", "embedding_min_size": 10}}'
    assert cli.main(["segment", str(heat_path), str(out), "--params", params]) == 0
    labels, attrs = read_volume(out)
    assert labels.max() == 2 and np.array_equal(labels > 0, truth > 0) and attrs["volume_depth"] == 6

    # NNC: the support set says which embeddings are mitochondria; the 'foreground'
    # channel is ignored (nnc_candidates 0), so the 240/5 heat plays no part.
    background_emb = np.array([0.0, -2.0, 1.0], np.float32)
    emb[:, ~foreground] = background_emb[:, None]
    write_embedding_heat(heat_path, emb, np.ones_like(foreground))
    support = tmp_path / "support.npz"
    support_features = np.concatenate([emb[:, truth == 1].T[:5], emb[:, truth == 2].T[:5], np.tile(background_emb, (10, 1))])
    save_support_set(support, support_features, np.array([1] * 10 + [0] * 10))
    params = ('{"segment": {"decoder": "nearest_neighbour", "embedding_min_size": 10, "nnc_k": 3, '
              f'"nnc_candidates": 0, "support_set": "{support}"}}}}')
    assert cli.main(["segment", str(heat_path), str(out), "--params", params]) == 0
    labels, _ = read_volume(out)
    assert labels.max() == 2 and np.array_equal(labels > 0, truth > 0)


@pytest.mark.bad_input
def test_cli_embedding_decoder_without_embeddings_or_support_says_what_to_do(tmp_path, capsys):
    heat_path = tmp_path / "block_0.h5"
    contract.fixture(heat_path, "heat", np.zeros((1, 4, 8, 8), np.uint8), voxel_size=[1, 1, 1])
    params = '{"segment": {"decoder": "embedding_cluster"}}'
    assert cli.main(["segment", str(heat_path), str(tmp_path / "out.h5"), "--params", params]) == 2
    assert "emb0" in capsys.readouterr().err
    emb, foreground, _ = touching_boxes()
    write_embedding_heat(heat_path, emb, foreground)
    params = f'{{"segment": {{"decoder": "nearest_neighbour", "support_set": "{tmp_path}/missing.npz"}}}}'
    assert cli.main(["segment", str(heat_path), str(tmp_path / "out.h5"), "--params", params]) == 2
    assert "missing.npz" in capsys.readouterr().err
    assert not (tmp_path / "out.h5").exists()
