"""A procedural audio-video world: clips of moving shapes that are seen and
heard, with labels that only sight and sound together tell apart."""

from patchwork.training.avworld.world import (
    DIRECTIONS,
    LABELS,
    MATERIALS,
    SAMPLE_RATE,
    SIDES,
    SPEEDS,
    WARMTH,
    AudioVideoWorld,
    Clip,
    Motion,
)

__all__ = ["DIRECTIONS", "LABELS", "MATERIALS", "SAMPLE_RATE", "SIDES", "SPEEDS", "WARMTH", "AudioVideoWorld", "Clip",
           "Motion"]
