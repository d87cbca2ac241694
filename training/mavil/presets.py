"""Training presets for MAViL: the audio-video world's size, the encoders, the masking and the schedules."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from patchwork.engines.layers import TransformerConfig
from patchwork.engines.mavil.config import AudioInput, VideoInput
from patchwork.training.loop import Schedule

# What stage 1 optimises: both losses (MAViL), or one of them alone (the ablations).
Objective = Literal["full", "reconstruction", "contrastive"]


class MavilPreset(BaseModel):
    model_config = ConfigDict(extra="forbid")

    world_seed: int = 0
    train_clips: int = Field(ge=2)
    heldout_clips: int = Field(ge=2)
    audio: AudioInput = Field(default_factory=AudioInput)
    video: VideoInput = Field(default_factory=VideoInput)
    audio_encoder: TransformerConfig
    video_encoder: TransformerConfig
    fusion: TransformerConfig
    # The reconstruction (stage 1) and feature-prediction (stage 2) decoders.
    decoder: TransformerConfig
    embed_dim: int = 64
    # Fractions of the audio patches and of the video tubelets hidden from the encoders in training.
    audio_masking: float = Field(default=0.8, ge=0.0, lt=1.0)
    video_masking: float = Field(default=0.8, ge=0.0, lt=1.0)
    # The fraction hidden in the second, lightly masked view of each modality the contrastive terms read.
    contrastive_masking: float = Field(default=0.2, ge=0.0, lt=1.0)
    # InfoNCE temperature, and the weights of the inter-modal (audio-video)
    # and intra-modal (two masked views of one modality) terms.
    temperature: float = Field(default=0.1, gt=0)
    inter_weight: float = Field(default=1.0, ge=0)
    intra_weight: float = Field(default=0.5, ge=0)
    schedule: Schedule
    # Full-batch AdamW steps of each linear probe on the frozen encoder.
    probe_steps: int = Field(default=300, ge=1)
    seed: int = 0


def _tiny() -> MavilPreset:
    return MavilPreset(
        train_clips=96,
        heldout_clips=32,
        audio=AudioInput(mel_bins=64, frames=32, patch=16, seconds=0.5),
        video=VideoInput(frames=4, image_size=32, tubelet_frames=4, patch=8),
        audio_encoder=TransformerConfig(dim=32, n_layers=1, n_heads=2),
        video_encoder=TransformerConfig(dim=32, n_layers=1, n_heads=2),
        fusion=TransformerConfig(dim=32, n_layers=1, n_heads=2),
        decoder=TransformerConfig(dim=32, n_layers=1, n_heads=2),
        embed_dim=16,
        schedule=Schedule(steps=20, batch_size=16, lr=2e-3),
        probe_steps=50,
    )


def _default() -> MavilPreset:
    # Sized to train each stage in a few minutes on 2 CPU cores (docs/mavil.md has the measured times).
    return MavilPreset(
        train_clips=2000,
        heldout_clips=256,
        video=VideoInput(tubelet_frames=8, patch=4),
        audio_encoder=TransformerConfig(dim=64, n_layers=2, n_heads=4),
        video_encoder=TransformerConfig(dim=64, n_layers=2, n_heads=4),
        fusion=TransformerConfig(dim=64, n_layers=2, n_heads=4),
        decoder=TransformerConfig(dim=48, n_layers=1, n_heads=4),
        schedule=Schedule(steps=800, batch_size=96, lr=2e-3),
    )


PRESETS = {"tiny": _tiny, "default": _default}
