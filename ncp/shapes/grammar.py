"""The shapes-world prompt grammar: scenes of coloured shapes on flat backgrounds.

One object:  "a large red circle on the left, gray background"
Two objects: "a small red circle left of a large blue square, white background"

`parse(prompt) -> Scene` and `Scene.prompt` round-trip exactly. A fixed set of colour-shape combinations is held
out of pretraining (`is_held_out`) so benchmarks can measure compositional generalisation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

# RGB values are chosen far apart so that a pixel judge can classify them after blur and noise.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 135, 25),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Two-object relations and the positions they imply for (first, second) object.
RELATIONS: dict[str, tuple[str, str]] = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}
# Colour-shape combinations never shown in pretraining (compositional generalisation probe).
HELD_OUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("yellow", "square")}
)

VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {"a", "on", "the", "at", "in", "of", "background", ","}
        | set(COLORS)
        | set(BACKGROUNDS)
        | set(SHAPES)
        | set(SIZES)
        | set(POSITIONS)
        | {w for rel in RELATIONS for w in rel.split()}
    )
)


class PromptError(ValueError):
    """A prompt that is not in the shapes grammar; the message says what was expected."""


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    background: str
    relation: str | None = None  # set for two-object scenes

    @property
    def prompt(self) -> str:
        def noun(o: ShapeObject) -> str:
            return f"a {o.size} {o.color} {o.shape}"

        if len(self.objects) == 1:
            o = self.objects[0]
            return f"{noun(o)} {POSITIONS[o.position]}, {self.background} background"
        a, b = self.objects
        return f"{noun(a)} {self.relation} {noun(b)}, {self.background} background"

    @property
    def held_out(self) -> bool:
        return any((o.color, o.shape) in HELD_OUT_COMBOS for o in self.objects)


def _expect(word: str | None, allowed: tuple[str, ...] | list[str], what: str, prompt: str) -> str:
    if word not in allowed:
        found = "end of prompt" if word is None else repr(word)
        raise PromptError(f"Expected {what} ({', '.join(allowed)}) but found {found} in prompt {prompt!r}.")
    return word


def parse(prompt: str) -> Scene:
    """Parse a prompt of the grammar into a Scene; raises PromptError naming the unexpected word."""
    if not isinstance(prompt, str):
        raise PromptError(f"Prompt must be a string, got {type(prompt).__name__}.")
    words = re.findall(r"[a-z]+|,", prompt.strip().lower())
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise PromptError(
            f"Unknown word {unknown[0]!r} in prompt {prompt!r}; the shapes world knows only: {', '.join(VOCABULARY)}."
        )
    it = iter(words)

    def nxt() -> str | None:
        return next(it, None)

    def read_noun() -> tuple[str, str, str]:
        _expect(nxt(), ["a"], "'a'", prompt)
        size = _expect(nxt(), SIZES, "a size", prompt)
        color = _expect(nxt(), list(COLORS), "a colour", prompt)
        shape = _expect(nxt(), SHAPES, "a shape", prompt)
        return size, color, shape

    size, color, shape = read_noun()
    w = nxt()
    phrases = {v.split()[0]: k for k, v in POSITIONS.items()}  # on/at/in
    if w in ("on", "at", "in"):
        # "on the left" / "at the top" / "in the center": check the whole phrase.
        _expect(nxt(), ["the"], "'the'", prompt)
        pos_word = _expect(nxt(), list(POSITIONS), "a position", prompt)
        if POSITIONS[pos_word].split()[0] != w:
            raise PromptError(f"Say {POSITIONS[pos_word]!r}, not '{w} the {pos_word}', in prompt {prompt!r}.")
        objects = (ShapeObject(color, shape, size, pos_word),)
        relation = None
    elif w in ("left", "right", "above", "below"):
        relation = w
        if w in ("left", "right"):
            _expect(nxt(), ["of"], "'of'", prompt)
            relation = f"{w} of"
        p1, p2 = RELATIONS[relation]
        size2, color2, shape2 = read_noun()
        objects = (ShapeObject(color, shape, size, p1), ShapeObject(color2, shape2, size2, p2))
    else:
        allowed = [*phrases, "left", "right", "above", "below"]
        _expect(w, allowed, "a position phrase or a relation", prompt)
        raise AssertionError("unreachable")
    _expect(nxt(), [","], "','", prompt)
    background = _expect(nxt(), list(BACKGROUNDS), "a background", prompt)
    _expect(nxt(), ["background"], "'background'", prompt)
    extra = nxt()
    if extra is not None:
        raise PromptError(f"Unexpected {extra!r} after the background in prompt {prompt!r}.")
    return Scene(objects=objects, background=background, relation=relation)


def all_single_scenes() -> list[Scene]:
    return [
        Scene((ShapeObject(c, s, z, p),), b)
        for b in BACKGROUNDS
        for c in COLORS
        for s in SHAPES
        for z in SIZES
        for p in POSITIONS
    ]


def random_scene(rng: random.Random, two_object_prob: float = 0.3, held_out: bool | None = False) -> Scene:
    """A random scene; held_out=False draws held-in scenes only, True held-out only, None either."""
    while True:
        bg = rng.choice(list(BACKGROUNDS))

        def obj(pos: str) -> ShapeObject:
            return ShapeObject(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(SIZES), pos)

        if rng.random() < two_object_prob:
            rel = rng.choice(list(RELATIONS))
            p1, p2 = RELATIONS[rel]
            a, b = obj(p1), obj(p2)
            if (a.color, a.shape) == (b.color, b.shape):
                continue  # two identical-looking objects make the relation unreadable
            scene = Scene((a, b), bg, rel)
        else:
            scene = Scene((obj(rng.choice(list(POSITIONS))),), bg)
        if held_out is None or scene.held_out == held_out:
            return scene


def probe_prompts(n: int, *, seed: int, two_object_prob: float = 0.0, held_out: bool = False) -> list[str]:
    """A fixed, reproducible list of prompts (distinct while possible) for evaluation."""
    rng = random.Random(seed)
    seen: list[str] = []
    tries = 0
    while len(seen) < n:
        p = random_scene(rng, two_object_prob, held_out).prompt
        tries += 1
        if p not in seen or tries > 50 * n:
            seen.append(p)
    return seen
