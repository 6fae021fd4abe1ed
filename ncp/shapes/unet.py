"""The shapes model's UNet: a stock `UNet2DConditionModel` whose first convolution also sees where it is.

A convolutional UNet is translation-equivariant except at the image border, so "on the left" can only be learned from
zero-padding effects; the first shapes model never learned it (position at chance, docs/research/shapes-layout.md).
Two fixed coordinate ramps (x and y in [-1, 1], CoordConv: Liu et al. 2018, "An intriguing failing of convolutional
neural networks and the CoordConv solution") are appended to the latents inside `conv_in`, so every code path that
runs the UNet (the pipeline, LoRA training, the NCP encoder, hot-swap) sees them without knowing they are there.
The config, the latent channels and every other module are the stock ones; diffusers loads it from `model_index.json`
by its module path (`ncp.shapes.unet`).
"""

from __future__ import annotations

import functools

import torch
from diffusers import ModelMixin, UNet2DConditionModel

# diffusers' pipeline loader finds a custom component's load method by looking its base classes (ModelMixin) up in the
# component's own module, so this module must export it.
__all__ = ["CoordConv2d", "ModelMixin", "PositionalUNet2DConditionModel"]


class CoordConv2d(torch.nn.Conv2d):
    """A Conv2d over the input plus two coordinate channels (x, then y), both linear in [-1, 1] across the map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) -> conv over (B, C + 2, H, W)
        b, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return super().forward(torch.cat([x, xs, ys], dim=1))


class PositionalUNet2DConditionModel(UNet2DConditionModel):
    """`UNet2DConditionModel` with a CoordConv `conv_in`; same config, same state-dict keys (conv_in's weight has two
    more input channels)."""

    @functools.wraps(UNet2DConditionModel.__init__)  # keeps the config signature diffusers reads
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        old = self.conv_in
        self.conv_in = CoordConv2d(
            old.in_channels + 2, old.out_channels, kernel_size=old.kernel_size, padding=old.padding
        )
