"""The network: an anisotropic residual 3D U-Net (the ``unetv3`` family), plain PyTorch.

EM voxels are several times deeper than wide (e.g. 40 x 8 x 8 nm), so the outer
levels convolve in-plane only (1x3x3) and pool y and x only; deeper levels, where
the voxels have become roughly isotropic, use 3x3x3 and also pool z. Decoder
levels upsample, project with a 1x1x1 convolution and add the encoder's skip
(as PyTC's residual U-Nets do), which costs less than concatenation on CPU.
The network returns logits, one channel per target channel (the 1x1x1 head is
one independent linear head per channel). Optional auxiliary heads on the
coarser decoder levels (deep supervision, as unetv3) are trained through
``forward_with_aux`` and ignored by ``forward``, which inference calls.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from emmito.io import EmmitoError
from emmito.targets import TARGET_CHANNELS, output_to_probability, target_channels

__all__ = ["TARGET_CHANNELS", "output_to_probability", "target_channels", "UNet3D", "build_model", "FlipAverage"]

# The model-config keys that fix the architecture; a checkpoint must agree with the config on these.
ARCHITECTURE_KEYS = ("filters", "conv3d_from_level", "pool_z_from_level", "norm", "upsample", "target")


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
    ):
        super().__init__()
        self.levels = len(filters)
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


def build_model(model_cfg: dict[str, Any]) -> nn.Module:
    """The U-Net described by the ``model`` config section (defaults filled)."""
    return UNet3D(
        filters=list(model_cfg["filters"]),
        out_channels=len(target_channels(model_cfg["target"])),
        conv3d_from_level=model_cfg["conv3d_from_level"],
        pool_z_from_level=model_cfg["pool_z_from_level"],
        norm=model_cfg["norm"],
        upsample=model_cfg.get("upsample", "trilinear"),
        deep_supervision=model_cfg.get("deep_supervision", 0),
    )


class FlipAverage(nn.Module):
    """Test-time augmentation: averages ``model``'s probabilities over y/x flips and the yx transpose.

    Returns logits again (the inverse sigmoid of the mean probability), so it
    drops into code that applies a sigmoid, e.g. ``infer.predict_slices``.
    ``target`` picks the output-to-probability map (``output_to_probability``).
    """

    def __init__(self, model: nn.Module, target: str = "binary", transforms: int = 8):
        super().__init__()
        self.model, self.target, self.transforms = model, target, transforms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        count = 0
        for transpose in (False, True):
            for flip_dims in ((), (3,), (4,), (3, 4)):
                if count >= self.transforms or (transpose and x.shape[3] != x.shape[4]):
                    continue
                view = x.transpose(3, 4) if transpose else x
                view = view.flip(flip_dims) if flip_dims else view
                probability = output_to_probability(self.model(view), self.target)
                probability = probability.flip(flip_dims) if flip_dims else probability
                probability = probability.transpose(3, 4) if transpose else probability
                total = probability if total is None else total + probability
                count += 1
        mean = (total / count).clamp(1e-6, 1 - 1e-6)
        return torch.log(mean) - torch.log1p(-mean)


def patch_divisors(model_cfg: dict[str, Any]) -> tuple[int, int, int]:
    """What the patch's (z, y, x) must each be divisible by for this architecture."""
    levels = len(model_cfg["filters"])
    z_poolings = max(0, levels - 1 - model_cfg["pool_z_from_level"])
    yx = 2 ** (levels - 1)
    return 2**z_poolings, yx, yx


def check_patch(patch: list[int] | tuple[int, ...], model_cfg: dict[str, Any], key: str = "model.patch") -> None:
    """Raise EmmitoError naming ``key`` unless ``patch`` (z, y, x) fits the architecture's poolings."""
    divisors = patch_divisors(model_cfg)
    if any(size % divisor for size, divisor in zip(patch, divisors)):
        fixed = [max(divisor, math.ceil(size / divisor) * divisor) for size, divisor in zip(patch, divisors)]
        raise EmmitoError(
            f"{key} is {list(patch)}, but a U-Net with {len(model_cfg['filters'])} levels "
            f"(pool_z_from_level={model_cfg['pool_z_from_level']}) needs z divisible by {divisors[0]} and y, x by {divisors[1]}: "
            f"use e.g. {fixed}"
        )


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(math.prod(p.shape) for p in model.parameters() if p.requires_grad)


class ProbabilityLogits(nn.Module):
    """Wraps a model so that sigmoid(output) = ``output_to_probability(model(x), target)``.

    ``predict_slices`` applies a sigmoid; for ``skeleton_distance`` (tanh output)
    (tanh(x) + 1) / 2 = sigmoid(2x), so the logits are doubled.
    """

    def __init__(self, model: nn.Module, target: str):
        super().__init__()
        self.model, self.scale = model, 2.0 if target == "skeleton_distance" else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out * self.scale if self.scale != 1.0 else out
