"""Training presets for CM3Leon: the image world's size, the tokenizers, the model and the schedules."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from patchwork.engines.cm3leon.audio import AudioVqConfig
from patchwork.engines.cm3leon.retrieval import RetrievalConfig
from patchwork.engines.cm3leon.vqvae import VqConfig
from patchwork.engines.layers import TransformerConfig
from patchwork.engines.mot.config import Untied
from patchwork.training.loop import Schedule


class Cm3LeonPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    world_seed: int = 0
    # How far a shape may sit from its cell's centre, in pixels (None: anywhere in its cell).
    world_jitter: int | None = Field(default=None, ge=0)
    train_images: int = Field(ge=1)
    heldout_images: int = Field(ge=1)
    text_vocab: int
    vq: VqConfig
    vq_schedule: Schedule
    retriever_schedule: Schedule
    # Training documents the memory bank holds (0: no retrieval).
    bank_size: int = Field(ge=0)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    transformer: TransformerConfig
    lm_schedule: Schedule
    max_sequence: int = 512
    # Training documents whose condition is dropped to <mask>: the unconditional stream of guided decoding.
    condition_dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    backbone: Literal["dense", "mot"] = "dense"
    untied: Untied = Untied.ALL
    # Clips of the audio-video world the model learns sound from (0: text and images only).
    audio_clips: int = Field(default=0, ge=0)
    heldout_audio_clips: int = Field(default=64, ge=1)
    audio: AudioVqConfig = Field(default_factory=AudioVqConfig)
    audio_iterations: int = Field(default=20, ge=1)  # k-means iterations of the audio codebook
    # Of each batch's documents, the caption-and-sound ones (when there is sound).
    audio_fraction: float = Field(default=0.25, ge=0.0, lt=1.0)
    seed: int = 0


def _tiny() -> Cm3LeonPreset:
    return Cm3LeonPreset(
        train_images=256,
        heldout_images=32,
        text_vocab=320,
        vq=VqConfig(channels=16, codes=64, code_dim=16),
        vq_schedule=Schedule(steps=30, batch_size=16, lr=2e-3),
        retriever_schedule=Schedule(steps=30, batch_size=32, lr=3e-3),
        bank_size=128,
        retrieval=RetrievalConfig(dim=16),
        transformer=TransformerConfig(dim=32, n_layers=2, n_heads=4),
        lm_schedule=Schedule(steps=30, batch_size=8, lr=3e-3),
    )


def _default() -> Cm3LeonPreset:
    # Sized to train in a few minutes on 2 CPU cores beside BLT's default; shapes sit within
    # a pixel of their cell's centre, so the image's freedom is small but not nil.
    return Cm3LeonPreset(
        world_jitter=1,
        train_images=8000,
        heldout_images=256,
        text_vocab=512,
        vq=VqConfig(channels=48, codes=256, code_dim=32),
        vq_schedule=Schedule(steps=1000, batch_size=32, lr=2e-3),
        retriever_schedule=Schedule(steps=300, batch_size=128, lr=3e-3),
        bank_size=4000,
        transformer=TransformerConfig(dim=128, n_layers=4, n_heads=4),
        lm_schedule=Schedule(steps=800, batch_size=16, lr=3e-3),
    )


def _mot_tiny() -> Cm3LeonPreset:
    """The tiny preset with sound and a Mixture-of-Transformers backbone."""
    return _tiny().model_copy(update={"backbone": "mot", "audio_clips": 256, "heldout_audio_clips": 32,
                                      "audio": AudioVqConfig(codes=32)})


def _mot_default() -> Cm3LeonPreset:
    """The default preset with sound and a Mixture-of-Transformers backbone (the study's mot-all run)."""
    return _default().model_copy(update={"backbone": "mot", "audio_clips": 2000})


PRESETS = {"tiny": _tiny, "default": _default, "mot-tiny": _mot_tiny, "mot-default": _mot_default}
