"""The U-Net: output shapes for a few architectures, and the patch constraint."""

from __future__ import annotations

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


def test_flip_average_is_flip_invariant_and_returns_logits():
    from emmito.model import FlipAverage

    torch.manual_seed(0)
    model = build_model(model_config(filters=[2, 4], conv3d_from_level=1, pool_z_from_level=1)).eval()
    tta = FlipAverage(model)
    x = torch.randn(1, 1, 2, 8, 8)
    with torch.no_grad():
        out = tta(x)
        assert torch.allclose(tta(x.flip(4)).flip(4), out, atol=1e-5)
        assert torch.allclose(tta(x.transpose(3, 4)).transpose(3, 4), out, atol=1e-5)
        # One transform = the model itself, through sigmoid and back.
        assert torch.allclose(FlipAverage(model, transforms=1)(x), model(x), atol=1e-4)
        # skeleton_distance: sigmoid of the result is the mean of (tanh + 1) / 2.
        single = FlipAverage(model, "skeleton_distance", transforms=1)(x)
        assert torch.allclose(torch.sigmoid(single), (torch.tanh(model(x)) + 1) / 2, atol=1e-5)
