"""The U-Net: output shapes for a few architectures, and the patch constraint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emmito.config import section_defaults
from emmito.io import EmmitoError
from emmito.model import build_model, check_patch, patch_divisors


def model_config(**overrides) -> dict:
    return {**section_defaults("model"), **overrides}


@pytest.mark.parametrize(
    "overrides, patch",
    [
        (dict(filters=[2, 4, 8], conv3d_from_level=1, pool_z_from_level=1), (4, 16, 16)),
        (dict(filters=[2, 4, 8], conv3d_from_level=0, pool_z_from_level=0, norm="batch", upsample="transpose"), (4, 8, 12)),
        (dict(filters=[3, 6], conv3d_from_level=2, pool_z_from_level=2, norm="none", upsample="nearest"), (3, 6, 10)),
        (dict(filters=[4, 8, 8, 16], norm="instance"), (2, 16, 24)),
    ],
)
def test_forward_keeps_the_patch_shape_with_one_logit_channel(overrides, patch):
    torch.manual_seed(0)
    model = build_model(model_config(**overrides))
    check_patch(patch, model_config(**overrides))
    out = model(torch.randn(2, 1, *patch))
    assert out.shape == (2, 1, *patch)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # Logits, not probabilities: a random net gives values on both sides of 0.
    assert out.min() < 0 < out.max() or out.std() > 0


def test_outer_levels_are_in_plane_and_deeper_ones_3d():
    model = build_model(model_config(filters=[2, 4, 8], conv3d_from_level=1, pool_z_from_level=1))
    assert model.encoders[0].conv1.kernel_size == (1, 3, 3)
    assert model.encoders[1].conv1.kernel_size == (3, 3, 3)
    assert model.scales == [(1, 2, 2), (2, 2, 2)]
    # With 1x3x3 convolutions everywhere (and no norm, which pools statistics over z), slices stay independent.
    flat = build_model(model_config(filters=[2, 4], conv3d_from_level=5, pool_z_from_level=5, norm="none")).eval()
    x = torch.randn(1, 1, 4, 8, 8)
    y = x.clone()
    y[:, :, 3] += 1.0
    with torch.no_grad():
        assert torch.equal(flat(x)[:, :, :3], flat(y)[:, :, :3])
        assert not torch.equal(flat(x)[:, :, 3], flat(y)[:, :, 3])


def test_patch_divisors_follow_the_pooling_levels():
    assert patch_divisors(model_config(filters=[16, 32, 64, 128], pool_z_from_level=2)) == (2, 8, 8)
    assert patch_divisors(model_config(filters=[16, 32, 64, 128], pool_z_from_level=0)) == (8, 8, 8)
    assert patch_divisors(model_config(filters=[4, 8], pool_z_from_level=1)) == (1, 2, 2)


def test_a_patch_that_does_not_pool_evenly_names_model_patch():
    config = model_config(filters=[16, 32, 64, 128], pool_z_from_level=2)
    check_patch((16, 128, 128), config)
    with pytest.raises(EmmitoError, match=r"model\.patch is \[15, 100, 128\].*z divisible by 2 and y, x by 8.*\[16, 104, 128\]"):
        check_patch((15, 100, 128), config)


def test_deep_supervision_heads_are_trained_outputs_that_inference_ignores():
    torch.manual_seed(0)
    config = model_config(filters=[2, 4, 8, 8], conv3d_from_level=1, pool_z_from_level=1, deep_supervision=5, target="binary_contour")
    model = build_model(config).eval()
    x = torch.randn(1, 1, 4, 16, 16)
    main, aux = model.forward_with_aux(x)
    # At most one head per coarse decoder level (levels - 2 of them), upsampled to the patch, 2 channels each.
    assert len(aux) == 2 and all(a.shape == (1, 2, 4, 16, 16) for a in aux)
    assert main.shape == (1, 2, 4, 16, 16) and torch.equal(model(x), main)
    assert not torch.equal(aux[0], aux[1])
    plain = build_model({**config, "deep_supervision": 0})
    assert not any(k.startswith("aux_heads") for k in plain.state_dict())


def test_embedding_head_adds_channels_and_heat_model_maps_them_to_heat():
    from emmito.embedding import embeddings_to_heat
    from emmito.prediction import to_heat
    from emmito.model import heat_model, output_channels

    torch.manual_seed(0)
    config = model_config(filters=[2, 4], conv3d_from_level=1, pool_z_from_level=1, target="skeleton_distance",
                          head="embedding", embedding_dim=3)
    assert output_channels(config) == ["skeleton_distance", "emb0", "emb1", "emb2"]
    model = build_model(config).eval()
    x = torch.randn(1, 1, 2, 8, 8)
    with torch.no_grad():
        raw = model(x)
        probability = torch.sigmoid(heat_model(model, config)(x))
    assert raw.shape == (1, 4, 2, 8, 8)
    # Target: (tanh + 1) / 2; embeddings: exactly the heat that embeddings_to_heat stores.
    assert torch.allclose(probability[:, 0], (torch.tanh(raw[:, 0]) + 1) / 2, atol=1e-6)
    assert np.abs(to_heat(probability[:, 1:].numpy()).astype(int) - embeddings_to_heat(raw[:, 1:].numpy()).astype(int)).max() <= 1


def test_two_dimensional_unet_treats_slices_independently():
    config = model_config(filters=[2, 4, 8], dimensions=2, conv3d_from_level=0, pool_z_from_level=0)
    torch.manual_seed(0)
    model = build_model(config).eval()
    assert all(m.kernel_size[0] == 1 for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    x = torch.randn(1, 1, 3, 16, 16)
    with torch.no_grad():
        whole = model(x)
        single = model(x[:, :, 1:2])
    assert torch.allclose(whole[:, :, 1:2], single, atol=1e-5)
    check_patch([1, 16, 16], config)  # no z pooling: any depth fits
