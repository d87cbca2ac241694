"""What each modality of an audio-video world clip carries, as class labels.

Sound carries the shape's kind (timbre), size (pitch), speed (rhythm),
vertical motion (glide: up, down, or level for left and right) and material
(decay); sight carries its kind (outline), size (side), speed (travel),
direction (all four) and colour. The per-attribute probes
(``training.mavil.probe``) and the supervised tower check
(``training.mavil.towers``) read these labels; the retrieval references
(``reference_recall``) match clips on what both modalities carry.
"""

from __future__ import annotations

import torch

from patchwork.training.avworld import Clip
from patchwork.training.avworld.world import DIRECTIONS, MATERIALS, SIDES, SPEEDS, WARMTH, Motion
from patchwork.training.imageworld.scene import KINDS

COLOURS = tuple(colour for colours in WARMTH.values() for colour in colours)
GLIDES = ("level", "up", "down")


def glide(motion: Motion) -> str:
    return motion.direction if motion.direction in ("up", "down") else "level"


# Attribute -> (its classes, the class of a motion), per modality.
CARRIED = {
    "audio": {
        "kind": (KINDS, lambda m: m.kind),
        "size": (tuple(SIDES), lambda m: m.side),
        "speed": (SPEEDS, lambda m: m.speed),
        "glide": (GLIDES, glide),
        "material": (MATERIALS, lambda m: m.material),
    },
    "video": {
        "kind": (KINDS, lambda m: m.kind),
        "size": (tuple(SIDES), lambda m: m.side),
        "speed": (SPEEDS, lambda m: m.speed),
        "direction": (DIRECTIONS, lambda m: m.direction),
        "colour": (COLOURS, lambda m: m.colour),
    },
}


def labels(clips: list[Clip], modality: str) -> dict[str, torch.Tensor]:
    """Attribute -> class indices [N] of every clip, for the attributes ``modality`` carries."""
    return {name: torch.tensor([classes.index(read(clip.motion)) for clip in clips])
            for name, (classes, read) in CARRIED[modality].items()}


def classes(modality: str) -> dict[str, int]:
    return {name: len(values) for name, (values, _) in CARRIED[modality].items()}


# What both modalities carry, in the order the references add it.
SHARED = {
    "kind": lambda m: m.kind,
    "kind + speed + glide": lambda m: (m.kind, m.speed, glide(m)),
    "kind + speed + glide + coarse size": lambda m: (m.kind, m.speed, glide(m), coarse_size(m.side)),
    "everything shared": lambda m: (m.kind, m.speed, glide(m), m.side),
}


def coarse_size(side: int) -> str:
    """Small, medium or large, as a listener tells pitch apart roughly (the world's sound captions)."""
    return "small" if side <= 8 else "large" if side >= 12 else "medium"


def reference_recall(clips: list[Clip], key, ks=(1, 5)) -> dict[str, float]:
    """Expected recall@k (the same both ways) of a retriever that matches
    clips exactly on ``key(motion)`` and ranks the clips sharing it with the
    query in random order: what retrieval reaches when the shared space
    carries that and nothing else."""
    keys = [key(clip.motion) for clip in clips]
    group = [keys.count(value) for value in keys]
    return {f"recall@{k}": sum(min(1.0, k / size) for size in group) / len(group) for k in ks}
