"""The network: an anisotropic residual 3D U-Net (the ``unetv3`` family), plain PyTorch.

EM voxels are several times deeper than wide (e.g. 40 x 8 x 8 nm), so the outer
levels convolve in-plane only (1x3x3) and pool y and x only; deeper levels, where
the voxels have become roughly isotropic, use 3x3x3 and also pool z. Decoder
levels upsample, project with a 1x1x1 convolution and add the encoder's skip
(as PyTC's residual U-Nets do), which costs less than concatenation on CPU.
``dimensions: 2`` makes it a 2D U-Net: every level 1x3x3 with yx pooling, and
each slice run as its own batch item (normalisation per slice), so a slice's
output does not depend on its neighbours.
The network returns logits, one channel per target channel (the 1x1x1 head is
one independent linear head per channel), then, with ``head: embedding``,
``embedding_dim`` channels of a per-voxel embedding (``emmito.embedding``). Optional auxiliary heads on the
coarser decoder levels (deep supervision, as unetv3) are trained through
``forward_with_aux`` and ignored by ``forward``, which inference calls.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from emmito import contract
from emmito.embedding import DEFAULT_EMBEDDING_RANGE, embedding_channel_names, embedding_logits
from emmito.io import EmmitoError
from emmito.resampling import POOLING_FACTORS, POOLING_TOLERANCE, pooling_factor
from emmito.targets import TARGET_CHANNELS, output_to_probability, target_channels

__all__ = [
    "TARGET_CHANNELS", "output_to_probability", "target_channels", "UNet3D", "build_model", "output_channels", "heat_model",
    "load_checkpoint", "resolve_model_config", "network_from_checkpoint", "pooling_for_volume", "trained_model_config",
    "load_weights", "freeze_encoder",
]

# The model-config keys that fix the architecture; a checkpoint must agree with the config on these.
ARCHITECTURE_KEYS = (
    "filters", "dimensions", "conv3d_from_level", "pool_z_from_level", "norm", "upsample", "target", "head", "embedding_dim"
)
# What a checkpoint fixes: its architecture, its auxiliary heads (their weights are in it) and the pooling it saw.
CHECKPOINT_FIXED_KEYS = (*ARCHITECTURE_KEYS, "deep_supervision", contract.DOWNSAMPLE_XY)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        # At most 8 groups, and a divisor of the channel count (tiny test models have 2-4 channels).
        groups = max(g for g in range(1, min(8, channels) + 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


def _kernel(level: int, conv3d_from_level: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(kernel, padding) of the convolutions at ``level``."""
    if level >= conv3d_from_level:
        return (3, 3, 3), (1, 1, 1)
    return (1, 3, 3), (0, 1, 1)


class ResidualBlock(nn.Module):
    """conv-norm-ReLU-conv-norm, plus the (projected) input, then ReLU. Shape-preserving in z, y, x."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int], padding: tuple[int, int, int], norm: str):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel, padding=padding, bias=bias)
        self.norm1 = _norm(norm, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel, padding=padding, bias=bias)
        self.norm2 = _norm(norm, out_channels)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1, bias=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.skip(x))


class UNet3D(nn.Module):
    """Input float32 (batch, 1, z, y, x), normalised intensities; output logits (batch, channels, z, y, x)."""

    def __init__(
        self,
        filters: list[int],
        out_channels: int,
        conv3d_from_level: int = 2,
        pool_z_from_level: int = 2,
        norm: str = "group",
        upsample: str = "trilinear",
        deep_supervision: int = 0,
        slicewise: bool = False,
    ):
        super().__init__()
        self.levels = len(filters)
        # A 2D U-Net: every slice runs as its own batch item, so normalisation is per slice too.
        self.slicewise = slicewise
        # Scale between level l and l+1: z halves only from pool_z_from_level on.
        self.scales = [(2 if level >= pool_z_from_level else 1, 2, 2) for level in range(self.levels - 1)]
        self.upsample_mode = upsample

        kernel, padding = _kernel(0, conv3d_from_level)
        self.stem = nn.Sequential(
            nn.Conv3d(1, filters[0], kernel, padding=padding, bias=norm == "none"),
            _norm(norm, filters[0]),
            nn.ReLU(inplace=True),
        )
        self.encoders = nn.ModuleList()
        self.pools = nn.ModuleList()
        for level in range(self.levels):
            kernel, padding = _kernel(level, conv3d_from_level)
            in_channels = filters[0] if level == 0 else filters[level - 1]
            self.encoders.append(ResidualBlock(in_channels, filters[level], kernel, padding, norm))
            if level < self.levels - 1:
                self.pools.append(nn.MaxPool3d(self.scales[level], self.scales[level]))

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(self.levels - 2, -1, -1):
            scale = self.scales[level]
            if upsample == "transpose":
                self.ups.append(nn.ConvTranspose3d(filters[level + 1], filters[level], scale, stride=scale, bias=False))
            else:
                self.ups.append(nn.Conv3d(filters[level + 1], filters[level], 1, bias=False))
            kernel, padding = _kernel(level, conv3d_from_level)
            self.decoders.append(ResidualBlock(filters[level], filters[level], kernel, padding, norm))
        self.head = nn.Conv3d(filters[0], out_channels, 1)
        # Auxiliary heads on the first (coarsest) decoder outputs, at most one per coarse level.
        aux_count = min(deep_supervision, self.levels - 2)
        self.aux_heads = nn.ModuleList(
            nn.Conv3d(filters[level], out_channels, 1) for level in range(self.levels - 2, self.levels - 2 - aux_count, -1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_aux(x, with_aux=False)[0]

    def forward_with_aux(self, x: torch.Tensor, with_aux: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits (batch, channels, z, y, x), auxiliary logits upsampled to the same shape, coarsest first)."""
        if self.slicewise:
            batch, _, depth, height, width = x.shape
            logits, aux = self._forward(x.transpose(1, 2).reshape(batch * depth, -1, 1, height, width), with_aux)

            def unfold(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(batch, depth, -1, height, width).transpose(1, 2)

            return unfold(logits), [unfold(a) for a in aux]
        return self._forward(x, with_aux)

    def _forward(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        size = x.shape[2:]
        aux: list[torch.Tensor] = []
        x = self.stem(x)
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x)
            if level < self.levels - 1:
                skips.append(x)
                x = self.pools[level](x)
        for up, decoder, skip, level in zip(self.ups, self.decoders, reversed(skips), range(self.levels - 2, -1, -1)):
            if self.upsample_mode == "transpose":
                x = up(x)
            else:
                # Project, then interpolate: both are linear, so this equals the other order, but the
                # 1x1x1 conv runs on the coarse grid and fewer channels get interpolated.
                x = nn.functional.interpolate(up(x), scale_factor=self.scales[level], mode=self.upsample_mode)
            x = decoder(x + skip)
            if with_aux and len(aux) < len(self.aux_heads):
                coarse = self.aux_heads[len(aux)](x)
                aux.append(nn.functional.interpolate(coarse, size=size, mode="trilinear"))
        return self.head(x), aux


def level_settings(model_cfg: dict[str, Any]) -> tuple[int, int]:
    """(conv3d_from_level, pool_z_from_level) in effect: ``dimensions: 2`` makes every level 1x3x3, yx pooling."""
    if model_cfg.get("dimensions", 3) == 2:
        levels = len(model_cfg["filters"])
        return levels, levels
    return model_cfg.get("conv3d_from_level", 2), model_cfg.get("pool_z_from_level", 2)


def embedding_dim(model_cfg: dict[str, Any]) -> int:
    """Number of embedding channels the model outputs (0 unless ``head: embedding``)."""
    return int(model_cfg.get("embedding_dim", 8)) if model_cfg.get("head", "target") == "embedding" else 0


def output_channels(model_cfg: dict[str, Any]) -> list[str]:
    """Names of the model's output channels, as heat files list them: the target's, then ``emb0..`` for an embedding head."""
    return target_channels(model_cfg["target"]) + embedding_channel_names(embedding_dim(model_cfg))


def build_model(model_cfg: dict[str, Any]) -> nn.Module:
    """The U-Net described by the ``model`` config section (defaults filled)."""
    conv3d_from_level, pool_z_from_level = level_settings(model_cfg)
    return UNet3D(
        filters=list(model_cfg["filters"]),
        out_channels=len(output_channels(model_cfg)),
        conv3d_from_level=conv3d_from_level,
        pool_z_from_level=pool_z_from_level,
        norm=model_cfg["norm"],
        upsample=model_cfg.get("upsample", "trilinear"),
        deep_supervision=model_cfg.get("deep_supervision", 0),
        slicewise=model_cfg.get("dimensions", 3) == 2,
    )


def patch_divisors(model_cfg: dict[str, Any]) -> tuple[int, int, int]:
    """What the patch's (z, y, x) must each be divisible by for this architecture."""
    levels = len(model_cfg["filters"])
    z_poolings = max(0, levels - 1 - level_settings(model_cfg)[1])
    yx = 2 ** (levels - 1)
    return 2**z_poolings, yx, yx


def check_patch(patch: list[int] | tuple[int, ...], model_cfg: dict[str, Any], key: str = "model.patch") -> None:
    """Raise EmmitoError naming ``key`` unless ``patch`` (z, y, x) fits the architecture's poolings."""
    divisors = patch_divisors(model_cfg)
    if any(size % divisor for size, divisor in zip(patch, divisors)):
        fixed = [max(divisor, math.ceil(size / divisor) * divisor) for size, divisor in zip(patch, divisors)]
        raise EmmitoError(
            f"{key} is {list(patch)}, but a U-Net with {len(model_cfg['filters'])} levels "
            f"(pool_z_from_level={level_settings(model_cfg)[1]}) needs z divisible by {divisors[0]} and y, x by {divisors[1]}: "
            f"use e.g. {fixed}"
        )


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(math.prod(p.shape) for p in model.parameters() if p.requires_grad)


class ProbabilityLogits(nn.Module):
    """Wraps a model so that sigmoid(output) is each channel's heat value in [0, 1], which ``predict_slices`` expects.

    Target channels: ``output_to_probability(model(x), target)``; for
    ``skeleton_distance`` (tanh output) (tanh(x) + 1) / 2 = sigmoid(2x), so the
    logits are doubled. The last ``embedding_dim`` channels (an embedding head)
    become ``embedding.embedding_logits``, so that blending and ``to_heat``
    store exactly ``embedding.embeddings_to_heat(e, embedding_range)``.
    """

    def __init__(self, model: nn.Module, target: str, embedding_dim: int = 0, embedding_range: float = DEFAULT_EMBEDDING_RANGE):
        super().__init__()
        self.model, self.scale = model, 2.0 if target == "skeleton_distance" else 1.0
        self.embedding_dim, self.embedding_range = embedding_dim, embedding_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.embedding_dim:
            targets, embeddings = out[:, : -self.embedding_dim], out[:, -self.embedding_dim :]
            return torch.cat([targets * self.scale, embedding_logits(embeddings, self.embedding_range)], 1)
        return out * self.scale if self.scale != 1.0 else out


def heat_model(model: nn.Module, model_cfg: dict[str, Any]) -> ProbabilityLogits:
    """``model`` wrapped for inference: sigmoid of its output = the heat of every channel in ``output_channels``."""
    return ProbabilityLogits(model, model_cfg["target"], embedding_dim(model_cfg))


# ---- checkpoints ------------------------------------------------------------------


@functools.cache
def _checkpoint_model_defaults() -> dict[str, Any]:
    """The schema's ``model`` defaults: what a checkpoint written before a model key existed was trained with.

    Looked up once per process (the package's own schema, not a user's config),
    at this one named point: ``trained_model_config`` fills old checkpoints'
    ``model_config`` from it. Nothing else in this module reads the schema.
    """
    from emmito.config import section_defaults

    return section_defaults("model")


def trained_model_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The complete ``model`` section a checkpoint was trained with.

    Keys added to the schema since it was written take their defaults (what it
    was trained with); the pooling factor is the checkpoint's own record of it.
    """
    trained = {**copy.deepcopy(_checkpoint_model_defaults()), **copy.deepcopy(checkpoint[contract.CHECKPOINT_MODEL_CONFIG])}
    trained[contract.DOWNSAMPLE_XY] = int(checkpoint.get(contract.CHECKPOINT_DOWNSAMPLE_XY, trained.get(contract.DOWNSAMPLE_XY, 1)))
    return trained


def resolve_model_config(
    checkpoint: dict[str, Any],
    model_cfg: dict[str, Any] | None,
    explicit: Iterable[str] | None,
    source: str | os.PathLike,
) -> dict[str, Any]:
    """The ``model`` section to run (or fine-tune) ``checkpoint`` with: the checkpoint's, except where the user set a key.

    ``explicit``: the dotted key paths the user set (``config.Validated.explicit``);
    None counts every key of ``model_cfg`` as set. A user-set key the checkpoint
    fixes (``CHECKPOINT_FIXED_KEYS``: the architecture and the pooling it saw)
    must agree with it, else a one-line EmmitoError names the key; a key left to
    its default never conflicts. A user-set ``model.patch`` is used where it fits
    the architecture (``check_patch``); other user-set keys (``name``,
    ``contour_width``, ...) are the user's.
    """
    trained = trained_model_config(checkpoint)
    model_cfg = model_cfg or {}
    if explicit is None:
        chosen = set(model_cfg)
    else:
        chosen = {path.split(".", 1)[1] for path in explicit if path.startswith("model.") and path.count(".") == 1}
    resolved = dict(trained)
    for key in sorted(chosen & set(model_cfg)):
        if key in CHECKPOINT_FIXED_KEYS:
            if model_cfg[key] != trained.get(key):
                raise EmmitoError(
                    f"{source} was trained with model.{key}={_show(trained.get(key))}, the config says {_show(model_cfg[key])}: "
                    f"retrain or fix the config (drop model.{key}: the checkpoint carries it)"
                )
        else:
            resolved[key] = copy.deepcopy(model_cfg[key])
    check_patch(resolved["patch"], resolved)
    return resolved


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Load ``state_dict`` into ``model``; weights that do not fit are a one-line EmmitoError naming ``source``."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise EmmitoError(
            f"{source}: its weights do not fit its model_config ({str(exc).splitlines()[0][:120]}): the file is corrupt; retrain"
        ) from None


def freeze_encoder(model: UNet3D) -> int:
    """Stop the encoder's parameters from learning (fine-tuning's ``train.freeze: encoder``); returns how many were frozen.

    The encoder: the stem and every encoder level, the bottom one included
    (``stem``, ``encoders``; max pooling has no parameters). The decoder levels, their
    upsampling projections (``ups``, ``decoders``) and the heads (``head``, ``aux_heads``)
    still learn. BatchNorm running statistics (``norm: batch``) still adapt in the
    frozen levels; GroupNorm and InstanceNorm keep none.
    """
    frozen = 0
    for module in (model.stem, model.encoders):
        for parameter in module.parameters():
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def network_from_checkpoint(
    checkpoint: dict[str, Any], model_cfg: dict[str, Any], source: str | os.PathLike, device: torch.device | str = "cpu"
) -> nn.Module:
    """The bare network of ``checkpoint`` (``build_model(model_cfg)``, its weights loaded) on ``device``, in train mode.

    ``model_cfg``: ``resolve_model_config``'s. Weights that do not fit are a one-line EmmitoError naming ``source``.
    """
    model = build_model(model_cfg)
    load_weights(model, checkpoint[contract.CHECKPOINT_STATE], source)
    return model.to(device)


def load_checkpoint(
    path: str | os.PathLike,
    model_cfg: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    explicit: Iterable[str] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``path`` (written by ``emmito train``) -> (model on ``device`` in eval mode, the checkpoint dict).

    The model is wrapped by ``heat_model``: sigmoid of its output is every channel's heat.
    It is built from the checkpoint's own ``model_config``; ``model_cfg`` and
    ``explicit`` are checked against it as ``resolve_model_config`` does (no
    ``model_cfg``: nothing to check). Missing or corrupt files raise a one-line
    EmmitoError (``contract.read_checkpoint``).
    """
    checkpoint = contract.read_checkpoint(path)
    resolved = resolve_model_config(checkpoint, model_cfg, explicit if model_cfg is not None else (), path)
    model = network_from_checkpoint(checkpoint, resolved, path, device)
    # predict_slices applies a sigmoid; the wrapper makes that the right heat for every
    # channel (a tanh output for skeleton_distance, embeddings), exactly as training validates.
    return heat_model(model, resolved).to(device).eval(), checkpoint


def pooling_for_volume(
    checkpoint: dict[str, Any], voxel_size: list[float], image_path: str | os.PathLike, checkpoint_path: str | os.PathLike
) -> int:
    """The y/x pooling factor that brings ``image_path``'s voxels (``voxel_size``, z, y, x nm) to the checkpoint's.

    ``resampling.pooling_factor`` against ``contract.CHECKPOINT_VOXEL_SIZE`` (the
    voxels the network saw); a one-line EmmitoError naming the image, both sizes
    and the fix when no factor of ``resampling.POOLING_FACTORS`` comes within
    ``resampling.POOLING_TOLERANCE``. A checkpoint without a voxel size (older
    than the key) gives the factor it was trained at. z is not resampled.
    """
    trained = checkpoint.get(contract.CHECKPOINT_VOXEL_SIZE)
    if trained is None:
        return int(trained_model_config(checkpoint)[contract.DOWNSAMPLE_XY])
    trained = [float(v) for v in trained]
    factor = pooling_factor(voxel_size[1:], trained[1:])
    if factor is None:
        raise EmmitoError(
            f"{image_path} has {_nm(voxel_size)} voxels but {checkpoint_path} was trained on {_nm(trained)} voxels, and no "
            f"y/x pooling by {', '.join(map(str, POOLING_FACTORS))} comes within {POOLING_TOLERANCE:.0%} of that: resample the "
            "images to it (or to a multiple of it), fix the volume's voxel_size in the config if it is wrong, "
            "or fine-tune at this voxel size (train.init_from)"
        )
    return factor


def _nm(voxel_size: list[float]) -> str:
    return "x".join(f"{v:g}" for v in voxel_size) + " nm"


def _show(value: Any) -> str:
    return str(list(value)).replace(" ", "") if isinstance(value, (list, tuple)) else str(value)
