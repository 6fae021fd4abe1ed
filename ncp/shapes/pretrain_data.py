"""The shapes pretraining's data: rendered scenes, their captions (with the noise a detuned base is trained on) and
the learning-rate schedule both stages share (`python -m ncp.shapes.pretrain`)."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import torch

from ncp.shapes.grammar import BACKGROUNDS, COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, Scene, random_scene
from ncp.shapes.model import IMAGE_SIZE
from ncp.shapes.render import render

NOISY = {
    "color": list(COLORS),
    "shape": list(SHAPES),
    "size": list(SIZES),
    "position": list(POSITIONS),  # one object: its position; two objects: their relation
    "background": list(BACKGROUNDS),
}  # attributes a caption can get wrong


def parse_caption_noise(spec: str) -> dict[str, float]:
    """'color=0.7,background=0.5' -> {attribute: probability that the caption names a random value instead}."""
    out: dict[str, float] = {}
    for part in filter(None, (x.strip() for x in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in NOISY or not value:
            raise ValueError(f"caption noise {part!r}: use ATTRIBUTE=P with ATTRIBUTE in {sorted(NOISY)}")
        p = float(value)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"caption noise {part!r}: the probability must be in [0, 1]")
        out[name] = p
    return out


def noisy_caption(scene: Scene, noise: dict[str, float], rng: random.Random) -> str:
    """The scene's prompt with each noisy attribute replaced, with its probability, by a value drawn uniformly (so
    sometimes the right one): web alt-text that often names the wrong colour. The image stays the true scene."""

    def pick(attr: str, value: str) -> str:
        return rng.choice(NOISY[attr]) if rng.random() < noise.get(attr, 0.0) else value

    objects = tuple(
        dataclasses.replace(o, color=pick("color", o.color), shape=pick("shape", o.shape), size=pick("size", o.size))
        for o in scene.objects
    )
    relation = scene.relation
    if len(objects) == 1:
        objects = (dataclasses.replace(objects[0], position=pick("position", objects[0].position)),)
    elif rng.random() < noise.get("position", 0.0):
        relation = rng.choice(list(RELATIONS))
        objects = tuple(dataclasses.replace(o, position=p) for o, p in zip(objects, RELATIONS[relation], strict=True))
    return dataclasses.replace(
        scene, objects=objects, relation=relation, background=pick("background", scene.background)
    ).prompt


def render_batch(
    rng: random.Random,
    n: int,
    two_object_prob: float,
    caption_noise: dict[str, float] | None = None,
    size: int = IMAGE_SIZE,
) -> tuple[list[str], torch.Tensor]:
    """n random held-in scenes -> prompts (noisy with `caption_noise`) and images in [-1, 1], shape (n, 3, size, size)."""
    scenes = [random_scene(rng, two_object_prob, held_out=False) for _ in range(n)]
    imgs = np.stack([render(s, size, rng, jitter=1.5) for s in scenes])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    prompts = [noisy_caption(s, caption_noise, rng) if caption_noise else s.prompt for s in scenes]
    return prompts, x


def lr_at(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))
