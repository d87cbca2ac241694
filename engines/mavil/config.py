"""Configuration of a MAViL checkpoint: one validated pydantic model, stored as config.json."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from patchwork.engines.filterbank import samples_for
from patchwork.engines.layers import TransformerConfig

FORMAT_VERSION = 1


class AudioInput(BaseModel):
    """The audio encoder's input: clips of ``seconds`` at 16 kHz, whose first
    ``frames`` filterbank frames of ``mel_bins`` bins (10 ms hop) are cut into
    ``patch`` x ``patch`` patches, after normalising with the training set's
    ``mean`` and ``std``. Frames a shorter sound lacks take ``floor``, the
    training set's 1st percentile of log-mel values (the quietest the encoder
    has heard); a checkpoint without one pads with digital silence."""

    model_config = ConfigDict(extra="forbid")

    sample_rate: Literal[16000] = 16000
    seconds: float = Field(default=1.0, gt=0)
    mel_bins: int = Field(default=128, ge=8)
    frames: int = Field(default=96, ge=8)
    patch: int = Field(default=16, ge=1)
    mean: float = 0.0
    std: float = Field(default=1.0, gt=0)
    floor: float | None = None

    @model_validator(mode="after")
    def _whole_patches(self) -> "AudioInput":
        if self.frames % self.patch or self.mel_bins % self.patch:
            raise ValueError(f"frames ({self.frames}) and mel_bins ({self.mel_bins}) must be multiples of patch "
                             f"({self.patch})")
        if samples_for(self.frames) > self.seconds * self.sample_rate:
            raise ValueError(f"{self.frames} frames need {samples_for(self.frames)} samples, more than "
                             f"{self.seconds} s")
        return self

    @property
    def tokens(self) -> int:
        return (self.frames // self.patch) * (self.mel_bins // self.patch)

    @property
    def patch_values(self) -> int:
        return self.patch * self.patch


class VideoInput(BaseModel):
    """The video encoder's input: ``frames`` RGB frames of ``image_size``
    pixels a side, cut into tubelets of ``tubelet_frames`` x ``patch`` x ``patch``."""

    model_config = ConfigDict(extra="forbid")

    frames: int = Field(default=8, ge=1)
    image_size: int = Field(default=32, ge=8)
    tubelet_frames: int = Field(default=2, ge=1)
    patch: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _whole_tubelets(self) -> "VideoInput":
        if self.frames % self.tubelet_frames or self.image_size % self.patch:
            raise ValueError(f"frames ({self.frames}) must be a multiple of tubelet_frames ({self.tubelet_frames}) "
                             f"and image_size ({self.image_size}) of patch ({self.patch})")
        return self

    @property
    def tokens(self) -> int:
        return (self.frames // self.tubelet_frames) * (self.image_size // self.patch) ** 2

    @property
    def patch_values(self) -> int:
        return self.tubelet_frames * self.patch * self.patch * 3


class MavilConfig(BaseModel):
    """Audio and video ViT encoders and a fusion encoder over their joined
    tokens (all of one width), the projections into the shared space that
    cross-modal retrieval searches, and the classes of the linear heads."""

    model_config = ConfigDict(extra="forbid")

    family: Literal["mavil"] = "mavil"
    format_version: Literal[1] = FORMAT_VERSION
    audio: AudioInput = Field(default_factory=AudioInput)
    video: VideoInput = Field(default_factory=VideoInput)
    audio_encoder: TransformerConfig
    video_encoder: TransformerConfig
    fusion: TransformerConfig
    # Width of the shared audio-video space (the contrastive projections).
    embed_dim: int = Field(default=64, ge=1)
    # Class names of the linear heads (empty: the checkpoint classifies nothing).
    labels: list[str] = Field(default_factory=list)
    # Which training stage made the weights: 1 (masked reconstruction and
    # contrast) or 2 (distilled from a stage-1 teacher).
    stage: Literal[1, 2] = 1

    @model_validator(mode="after")
    def _one_width(self) -> "MavilConfig":
        stacks = {"audio_encoder": self.audio_encoder, "video_encoder": self.video_encoder, "fusion": self.fusion}
        widths = {stack.dim for stack in stacks.values()}
        if len(widths) != 1:
            raise ValueError(f"audio_encoder, video_encoder and fusion must share one dim, not {sorted(widths)}")
        windowed = [name for name, stack in stacks.items() if stack.window is not None]
        if windowed:
            raise ValueError(f"{', '.join(windowed)}: the encoders attend to every token (window must be unset)")
        return self

    @property
    def dim(self) -> int:
        return self.fusion.dim
