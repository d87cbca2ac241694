"""Clips of the procedural audio-video world: one moving shape, seen and heard.

A clip is ``frames`` RGB frames (a coloured shape on black, moving in a
straight line) and ``seconds`` of 16 kHz mono audio that the shape makes:

- its **kind** sets the timbre (circle: a pure tone; square: odd harmonics;
  triangle: every harmonic), seen as its outline;
- its **size** sets the pitch (the smallest sounds two octaves above the
  largest), seen as its side in pixels;
- its **speed** sets the rhythm (faster shapes strike more often), seen as how
  far it travels over the clip;
- its **direction** bends the pitch when it moves vertically (rising up,
  falling down); left and right sound the same;
- its **material** (wood or metal) is heard only: wood strikes die out fast,
  metal rings on with an inharmonic partial;
- its **colour** is seen only.

The label is (material, colour warmth, kind): 12 classes. Two classes that
differ in material look the same, and two that differ in warmth sound the
same, so audio alone and video alone each tell at most half of them apart,
and only the two together can tell all of them. Every clip is a pure function
of the world's seed and its index, so a world of any size is the same on
every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from patchwork.training.imageworld.scene import BACKGROUND, COLOURS, KINDS, draw_shape

SAMPLE_RATE = 16_000
MATERIALS = ("wood", "metal")
WARMTH = {"warm": ("red", "yellow"), "cool": ("green", "blue")}
DIRECTIONS = ("left", "right", "up", "down")
# A shape's side in pixels at 32x32 frames (scaled with the frame size), and
# its speeds: a shape of speed s travels TRAVEL * s pixels (at 32x32) over the clip.
SIDES = range(6, 15)
SPEEDS = (1, 2, 3)
TRAVEL = 4
LABELS = tuple(f"{material} {warmth} {kind}" for material in MATERIALS for warmth in WARMTH for kind in KINDS)

# Harmonic amplitudes of each kind's timbre, from the fundamental up.
_HARMONICS = {
    "circle": (1.0,),
    "square": (1.0, 0.0, 1 / 3, 0.0, 1 / 5, 0.0, 1 / 7),
    "triangle": (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6),
}
# Each strike's decay time (s), and the metal's partial at 2.76 times the fundamental.
_DECAY = {"wood": 0.03, "metal": 0.25}
_METAL_PARTIAL = (2.76, 0.5)


@dataclass(frozen=True)
class Motion:
    """What a clip shows and sounds like."""

    kind: str
    colour: str
    side: int  # pixels at 32x32
    material: str
    direction: str
    speed: int  # one of SPEEDS

    @property
    def warmth(self) -> str:
        return next(name for name, colours in WARMTH.items() if self.colour in colours)

    @property
    def label(self) -> str:
        return f"{self.material} {self.warmth} {self.kind}"

    @property
    def pitch(self) -> float:
        """The fundamental (Hz): 880 for the smallest side, 220 for the largest."""
        return 880.0 * 2 ** (-2 * (self.side - SIDES[0]) / (SIDES[-1] - SIDES[0]))

    @property
    def strikes_per_second(self) -> float:
        return 2.0 + 2.0 * self.speed

    @property
    def sound_caption(self) -> str:
        """What a listener can tell, in words: size (pitch), material, kind
        (timbre), speed (rhythm) and vertical motion (glide); never colour.
        E.g. "the sound of a small metal square striking fast, rising"."""
        size = "small" if self.side <= 8 else "large" if self.side >= 12 else "medium"
        pace = ("slowly", "steadily", "fast")[SPEEDS.index(self.speed)]
        glide = {"up": ", rising", "down": ", falling"}.get(self.direction, "")
        material = "wooden" if self.material == "wood" else self.material
        return f"the sound of a {size} {material} {self.kind} striking {pace}{glide}"


@dataclass(frozen=True)
class Clip:
    index: int
    motion: Motion
    frames: np.ndarray  # uint8 (frames, size, size, 3)
    waveform: np.ndarray  # float32 (samples,), in [-1, 1], at SAMPLE_RATE
    label: int  # index into LABELS


def sample_motion(rng: random.Random) -> Motion:
    warmth = rng.choice(sorted(WARMTH))
    return Motion(kind=rng.choice(KINDS), colour=rng.choice(WARMTH[warmth]), side=rng.choice(SIDES),
                  material=rng.choice(MATERIALS), direction=rng.choice(DIRECTIONS), speed=rng.choice(SPEEDS))


def render_frames(motion: Motion, start: tuple[float, float], frames: int, size: int) -> np.ndarray:
    """The shape at ``start`` (its box's top-left corner as fractions of the
    room it has) travelling at its speed, frames spread evenly over the clip:
    uint8 (frames, size, size, 3)."""
    scale = size / 32
    side = round(motion.side * scale)
    travel = TRAVEL * motion.speed * scale
    step = travel / (frames - 1)
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[motion.direction]
    room = size - side - travel  # where the first frame may sit along the motion so the last stays inside
    x0 = start[0] * (room if dx else size - side) + (travel if dx < 0 else 0)
    y0 = start[1] * (room if dy else size - side) + (travel if dy < 0 else 0)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i in range(frames):
        image = Image.new("RGB", (size, size), BACKGROUND)
        draw_shape(ImageDraw.Draw(image), motion.kind, round(x0 + dx * step * i), round(y0 + dy * step * i),
                   side, side, COLOURS[motion.colour])
        out[i] = np.asarray(image)
    return out


def synthesize(motion: Motion, seconds: float, rng: random.Random) -> np.ndarray:
    """The clip's sound: strikes of the shape's timbre at its rhythm, float32 in [-1, 1]."""
    samples = round(seconds * SAMPLE_RATE)
    t = np.arange(samples) / SAMPLE_RATE
    glide = {"up": 0.5, "down": -0.5}.get(motion.direction, 0.0)  # octaves over the clip
    frequency = motion.pitch * 2 ** (glide * t / seconds)
    phase = 2 * np.pi * np.cumsum(frequency) / SAMPLE_RATE
    tone = sum(a * np.sin(n * phase) for n, a in enumerate(_HARMONICS[motion.kind], start=1) if a)
    if motion.material == "metal":
        ratio, amplitude = _METAL_PARTIAL
        tone = tone + amplitude * np.sin(ratio * phase)
    period = 1.0 / motion.strikes_per_second
    since_strike = (t - rng.uniform(0, period)) % period
    envelope = np.exp(-since_strike / _DECAY[motion.material]) * np.minimum(1.0, since_strike / 0.005)
    generator = np.random.default_rng(rng.randrange(2**32))
    sound = tone * envelope + 0.02 * generator.standard_normal(samples)
    return (rng.uniform(0.5, 0.9) * sound / np.abs(sound).max()).astype(np.float32)


class AudioVideoWorld:
    """Clips ``world[i]`` for any i >= 0, each a pure function of (seed, i)."""

    def __init__(self, seed: int = 0, frames: int = 8, image_size: int = 32, seconds: float = 1.0):
        if frames < 2:
            raise ValueError(f"frames must be at least 2, not {frames}")
        if image_size < 32:
            raise ValueError(f"image_size must be at least 32, not {image_size}")
        if seconds <= 0:
            raise ValueError(f"seconds must be positive, not {seconds}")
        self.seed, self.frames, self.image_size, self.seconds = seed, frames, image_size, seconds

    def __getitem__(self, index: int) -> Clip:
        if index < 0:
            raise IndexError(index)
        rng = random.Random(f"avworld/{self.seed}/{index}")
        motion = sample_motion(rng)
        start = (rng.random(), rng.random())
        frames = render_frames(motion, start, self.frames, self.image_size)
        waveform = synthesize(motion, self.seconds, rng)
        return Clip(index, motion, frames, waveform, LABELS.index(motion.label))

    def take(self, count: int, start: int = 0) -> list[Clip]:
        return [self[i] for i in range(start, start + count)]
