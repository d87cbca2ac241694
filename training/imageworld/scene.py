"""Scenes, their sampling and rendering.

A scene is one to three shapes, each in its own quadrant (cell) of a square
image on a black background. A shape has a kind (circle, square, triangle),
a colour from a fixed palette, a size (small or large) and a position inside
its cell that never touches the cell's border, so two shapes never touch.
A world's ``jitter`` bounds how far a shape may sit from its cell's centre
(None: anywhere in the cell); captions never say where in its cell a shape
sits, so jitter is the image's freedom that the text does not determine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle")
# The palette: far apart in RGB, so the nearest palette colour of a pixel is
# exact on rendered images and tolerant on generated ones.
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "white": (235, 235, 235),
}
BACKGROUND = (0, 0, 0)
SIZES = ("small", "large")
CELLS = ("top left", "top right", "bottom left", "bottom right")
MAX_SHAPES = 3


def side_of(size: str, image_size: int) -> int:
    """A shape's side in pixels: 7 (small) or 12 (large) at 32x32, scaled with the image."""
    return round((7 if size == "small" else 12) * image_size / 32)


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cell: int  # index into CELLS
    # Top-left corner of the shape's box inside its cell, in pixels.
    dx: int = 0
    dy: int = 0

    @property
    def attributes(self) -> tuple[str, str, str, int]:
        """What captions and the parser say of a shape: kind, colour, size, cell."""
        return (self.kind, self.colour, self.size, self.cell)


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # in cell order

    @property
    def attributes(self) -> list[tuple[str, str, str, int]]:
        return [shape.attributes for shape in self.shapes]


def sample_scene(rng: random.Random, image_size: int, jitter: int | None = None) -> Scene:
    """A random scene; each shape's box starts within ``jitter`` pixels of its
    cell's centred placement (anywhere in the cell when None). The random
    draws do not depend on ``jitter``: worlds that differ only in it hold the
    same scenes, placed differently."""
    cells = sorted(rng.sample(range(len(CELLS)), rng.randint(1, MAX_SHAPES)))
    shapes = []
    for cell in cells:
        size = rng.choice(SIZES)
        room = image_size // 2 - side_of(size, image_size) - 1  # at least one pixel to the cell's border
        shapes.append(Shape(kind=rng.choice(KINDS), colour=rng.choice(sorted(COLOURS)), size=size, cell=cell,
                            dx=_placed(rng.randint(1, room), room, jitter),
                            dy=_placed(rng.randint(1, room), room, jitter)))
    return Scene(tuple(shapes))


def _placed(draw: int, room: int, jitter: int | None) -> int:
    """A draw in [1, room] mapped evenly onto the offsets within ``jitter`` of the centred one."""
    if jitter is None:
        return draw
    centre = (1 + room) // 2
    low, high = max(1, centre - jitter), min(room, centre + jitter)
    return low + (draw - 1) * (high - low + 1) // room


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, left: int, top: int, width: int, height: int, fill) -> None:
    """Draws one shape filling the box (left, top, width, height); the parser draws the same templates."""
    right, bottom = left + width - 1, top + height - 1
    if kind == "circle":
        draw.ellipse([left, top, right, bottom], fill=fill)
    elif kind == "square":
        draw.rectangle([left, top, right, bottom], fill=fill)
    else:  # an upright triangle
        draw.polygon([(left + (width - 1) / 2, top), (left, bottom), (right, bottom)], fill=fill)


def render(scene: Scene, image_size: int = 32) -> np.ndarray:
    """The scene's image: uint8, (image_size, image_size, 3)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    half = image_size // 2
    for shape in scene.shapes:
        row, col = divmod(shape.cell, 2)
        side = side_of(shape.size, image_size)
        draw_shape(draw, shape.kind, col * half + shape.dx, row * half + shape.dy, side, side, COLOURS[shape.colour])
    return np.asarray(image)


@dataclass(frozen=True)
class Example:
    index: int
    scene: Scene
    image: np.ndarray  # uint8 (size, size, 3)
    caption: str  # the true caption
    alt_text: str  # a web-style alt-text: sometimes right, often noisy
    noise: tuple[str, ...]  # what is wrong with alt_text (empty: nothing)


class ImageWorld:
    """Examples ``world[i]`` for any i >= 0, each a pure function of (seed, i)."""

    def __init__(self, seed: int = 0, image_size: int = 32, noisy_fraction: float = 0.5, jitter: int | None = None):
        if image_size not in (32, 64):
            raise ValueError(f"image_size must be 32 or 64, not {image_size}")
        if jitter is not None and jitter < 0:
            raise ValueError(f"jitter must be at least 0, not {jitter}")
        self.seed, self.image_size, self.noisy_fraction, self.jitter = seed, image_size, noisy_fraction, jitter

    def __getitem__(self, index: int) -> Example:
        from patchwork.training.imageworld.text import alt_text, caption

        if index < 0:
            raise IndexError(index)
        rng = random.Random(f"imageworld/{self.seed}/{index}")
        scene = sample_scene(rng, self.image_size, self.jitter)
        text, noise = alt_text(scene, rng, self.noisy_fraction)
        return Example(index, scene, render(scene, self.image_size), caption(scene), text, noise)

    def take(self, count: int, start: int = 0) -> list[Example]:
        return [self[i] for i in range(start, start + count)]
