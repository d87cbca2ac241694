"""Captions and alt-texts of scenes, and reading attributes back from text.

A true caption names every shape in cell order, e.g. "a large red circle at
the top left and a small blue square at the bottom right". An alt-text is
what a web page might carry instead: the caption, or (with probability
``noisy_fraction``) the caption with one kind of noise, recorded by name.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from patchwork.training.imageworld.scene import CELLS, COLOURS, KINDS, SIZES, Scene, Shape

NOISE_KINDS = ("wrong_colour", "wrong_shape", "missing_attribute", "missing_object", "boilerplate", "spam")
_BOILERPLATE = ("stock photo: {} | royalty free", "{} - image 1 of 20", "download hd wallpaper {}")
_SPAM = ("best deals click here", "free shipping on all orders", "img_{:04d}.jpg", "untitled")


def _phrase(shape: Shape, with_size: bool = True, with_colour: bool = True) -> str:
    words = ["a"] + ([shape.size] if with_size else []) + ([shape.colour] if with_colour else []) + [shape.kind]
    return f"{' '.join(words)} at the {CELLS[shape.cell]}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene) -> str:
    return _join([_phrase(shape) for shape in scene.shapes])


def alt_text(scene: Scene, rng: random.Random, noisy_fraction: float = 0.5) -> tuple[str, tuple[str, ...]]:
    """An alt-text of ``scene`` and the noise it carries (empty: the true caption)."""
    if rng.random() >= noisy_fraction:
        return caption(scene), ()
    noise = rng.choice(NOISE_KINDS)
    shapes = list(scene.shapes)
    victim = rng.randrange(len(shapes))
    if noise == "missing_object" and len(shapes) < 2:
        noise = "missing_attribute"
    if noise == "wrong_colour":
        shapes[victim] = replace(shapes[victim], colour=rng.choice([c for c in sorted(COLOURS)
                                                                   if c != shapes[victim].colour]))
    elif noise == "wrong_shape":
        shapes[victim] = replace(shapes[victim], kind=rng.choice([k for k in KINDS if k != shapes[victim].kind]))
    elif noise == "missing_object":
        del shapes[victim]
    elif noise == "spam":
        return rng.choice(_SPAM).format(rng.randrange(10000)), (noise,)
    phrases = [_phrase(shape) for shape in shapes]
    if noise == "missing_attribute":
        drop_size = rng.random() < 0.5
        phrases[victim] = _phrase(shapes[victim], with_size=not drop_size, with_colour=drop_size)
    text = _join(phrases)
    if noise == "boilerplate":
        text = rng.choice(_BOILERPLATE).format(text)
    return text, (noise,)


@dataclass(frozen=True)
class Mention:
    """A shape as a text mentions it; None where the text leaves an attribute out."""

    kind: str
    colour: str | None
    size: str | None
    cell: int | None


_MENTION = re.compile(
    rf"\b(?:(?P<size>{'|'.join(SIZES)})\s+)?(?:(?P<colour>{'|'.join(COLOURS)})\s+)?(?P<kind>{'|'.join(KINDS)})"
    rf"(?:\s+at\s+the\s+(?P<cell>{'|'.join(CELLS)}))?"
)


def read_caption(text: str) -> list[Mention]:
    """Every shape ``text`` mentions, with the attributes it gives."""
    return [
        Mention(kind=m["kind"], colour=m["colour"], size=m["size"], cell=CELLS.index(m["cell"]) if m["cell"] else None)
        for m in _MENTION.finditer(text.lower())
    ]
