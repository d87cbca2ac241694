"""A procedural image world: scenes of coloured shapes, their images, true
captions and noisy alt-texts, and a parser that reads scenes back from images.

Every example is a pure function of the world's seed and its index, so a
world of any size is the same on every machine. The scene parser is the judge
of every image metric (text->image attribute accuracy, reconstruction
agreement); ``read_caption`` reads the same attributes back from text.
"""

from patchwork.training.imageworld.parser import parse_image
from patchwork.training.imageworld.scene import (
    CELLS,
    COLOURS,
    KINDS,
    SIZES,
    Example,
    ImageWorld,
    Scene,
    Shape,
    render,
)
from patchwork.training.imageworld.text import NOISE_KINDS, alt_text, caption, read_caption

__all__ = [
    "CELLS", "COLOURS", "KINDS", "NOISE_KINDS", "SIZES", "Example", "ImageWorld", "Scene", "Shape", "alt_text",
    "caption", "parse_image", "read_caption", "render",
]
