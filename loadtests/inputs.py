"""Small valid inputs for the load tests' requests, made here at the served
models' sizes: texts about the shapes of the image world the CM3Leon presets
learn (one shape a picture), PNG pictures of such a shape, and audio-video
clips (a WAV tone and PNG frames of a square moving across).
"""

from __future__ import annotations

import io
import itertools
import random

import numpy as np
from PIL import Image, ImageDraw

from patchwork.engines.wav import wav_bytes
from patchwork.loadtests.plan import ClipInputs
from patchwork.v1 import audiovideo_pb2

SIZES = ("small", "large")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
KINDS = ("circle", "square", "triangle")
CELLS = ("top left", "top right", "bottom left", "bottom right")
SHAPES = list(itertools.product(SIZES, COLOURS, KINDS, range(len(CELLS))))


def describe(size: str, colour: str, kind: str, cell: int) -> str:
    return f"a {size} {colour} {kind} at the {CELLS[cell]}"


def prompts() -> list[str]:
    """A prompt for an image, one for each shape."""
    return [describe(*shape) for shape in SHAPES]


def infill_texts() -> list[str]:
    """Descriptions with their colour and place masked."""
    return [f"a {size} <mask> {kind} at the <mask>" for size, kind in itertools.product(SIZES, KINDS)]


def _png(pixels: Image.Image) -> bytes:
    buffer = io.BytesIO()
    pixels.save(buffer, format="PNG")
    return buffer.getvalue()


def picture(size: str, colour: str, kind: str, cell: int, side: int) -> bytes:
    """A PNG of one shape on black, ``side`` pixels square."""
    image = Image.new("RGB", (side, side))
    extent = round((7 if size == "small" else 12) * side / 32)
    left, top = (cell % 2) * side // 2 + side // 8, (cell // 2) * side // 2 + side // 8
    box = (left, top, left + extent, top + extent)
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif kind == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(left, top + extent), (left + extent // 2, top), (left + extent, top + extent)],
                     fill=COLOURS[colour])
    return _png(image)


def pictures(side: int, count: int, seed: int = 0) -> list[bytes]:
    return [picture(*shape, side) for shape in random.Random(seed).sample(SHAPES, count)]


def clip(inputs: ClipInputs, tone_hz: float, colour: tuple[int, int, int]) -> audiovideo_pb2.Clip:
    """A clip of the model's length: a tone, and frames of a square moving left to right."""
    times = np.arange(round(inputs.seconds * inputs.sample_rate)) / inputs.sample_rate
    wav = wav_bytes(0.5 * np.sin(2 * np.pi * tone_hz * times), inputs.sample_rate)
    side, frames = inputs.frame_size, []
    for index in range(inputs.frames):
        image = Image.new("RGB", (side, side))
        left = index * (side // 2) // max(1, inputs.frames - 1)
        ImageDraw.Draw(image).rectangle((left, side // 4, left + side // 2, 3 * side // 4), fill=colour)
        frames.append(_png(image))
    return audiovideo_pb2.Clip(wav=wav, frames=frames)


def clips(inputs: ClipInputs) -> list[audiovideo_pb2.Clip]:
    """One clip for each colour, each with a tone of its own."""
    return [clip(inputs, 220.0 * (index + 1), colour) for index, colour in enumerate(COLOURS.values())]
