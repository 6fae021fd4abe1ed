"""The VAE's edge loss: it sees what a per-pixel loss barely does (the corners of a small shape), and nothing else."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ncp.shapes.grammar import parse
from ncp.shapes.pretrain_vae import edge_loss, vae_loss
from ncp.shapes.render import render


def _image(prompt: str) -> torch.Tensor:
    return torch.from_numpy(render(parse(prompt), 64)).permute(2, 0, 1)[None].float() / 127.5 - 1


def _foreground(x: torch.Tensor) -> torch.Tensor:
    return ((x - x[:, :, :1, :1]).abs().amax(dim=1, keepdim=True) > 0.1).float()


def test_edge_loss_penalises_rounded_corners_more_than_the_pixel_loss_does() -> None:
    x = _image("a small red square in the center, white background")
    rounded = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)  # a soft copy: the corners go first
    fg = _foreground(x)
    assert edge_loss(x, x, fg).item() == 0.0
    assert edge_loss(rounded, x, fg).item() > 0.0
    plain, with_edges = vae_loss(rounded, x, 10.0), vae_loss(rounded, x, 10.0, edge_weight=2.0)
    # At the refit's weight the edge term is not a rounding error on top of the pixel loss: for a soft small square
    # it adds more than half as much again.
    assert with_edges.item() - plain.item() > 0.5 * plain.item(), (plain.item(), with_edges.item())


def test_edge_loss_ignores_the_background_away_from_the_objects() -> None:
    x = _image("a small blue triangle on the left, white background")
    noisy = x.clone()
    noisy[..., 50:, 50:] += 0.3 * torch.from_numpy(np.random.default_rng(0).standard_normal((3, 14, 14))).float()
    assert edge_loss(noisy, x, _foreground(x)).item() == 0.0  # the bottom-right corner is far from the object
    assert vae_loss(noisy, x, 10.0).item() > 0.0  # the pixel loss still sees it
