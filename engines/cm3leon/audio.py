"""The audio tokenizer: a small vector quantiser of log-mel spectrogram frames.

A clip of at most ``seconds`` of 16 kHz sound (shorter ones padded with
silence) becomes its log-mel filterbank (``engines.filterbank``, ``mel_bins``
bins), normalised per bin; every ``frames_per_token`` consecutive frames
(10 ms apart) are one vector, replaced by the nearest of ``codes`` codebook
vectors. One second at the defaults is 24 tokens of 40 ms. The codebook is
fitted by k-means (``training.cm3leon.audio``); ``decode`` turns codes back
into the spectrogram frames they stand for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from patchwork.engines.filterbank import HOP, N_FFT, log_mel

SAMPLE_RATE = 16_000


class AudioVqConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = Field(default=1.0, gt=0.0, le=30.0)
    mel_bins: int = Field(default=32, ge=8)
    frames_per_token: int = Field(default=4, ge=1)
    codes: int = Field(default=128, ge=2)

    @property
    def samples(self) -> int:
        return round(self.seconds * SAMPLE_RATE)

    @property
    def tokens(self) -> int:
        """Tokens of a clip: its whole filterbank frames, grouped."""
        frames = max(0, (self.samples - N_FFT) // HOP + 1)
        return frames // self.frames_per_token

    @property
    def token_dim(self) -> int:
        return self.frames_per_token * self.mel_bins


class AudioTokenizer(nn.Module):
    def __init__(self, config: AudioVqConfig):
        super().__init__()
        if config.tokens < 1:
            raise ValueError(f"{config.seconds} s is too short for one token of {config.frames_per_token} frames")
        self.config = config
        self.register_buffer("mean", torch.zeros(config.mel_bins))  # per mel bin, over the training clips
        self.register_buffer("std", torch.ones(config.mel_bins))
        self.register_buffer("codebook", torch.zeros(config.codes, config.token_dim))

    def spectrogram(self, waveforms: torch.Tensor) -> torch.Tensor:
        """[B, samples] at 16 kHz (at most ``config.samples``) -> log-mel [B, tokens * frames_per_token, mel_bins]."""
        config = self.config
        if waveforms.shape[-1] > config.samples:
            raise ValueError(f"{waveforms.shape[-1]} samples; at most {config.samples}")
        padded = F.pad(waveforms.float(), (0, config.samples - waveforms.shape[-1]))
        return log_mel(padded, config.mel_bins)[:, : config.tokens * config.frames_per_token]

    def vectors(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """Log-mel [B, tokens * frames_per_token, mel_bins] -> normalised token vectors [B, tokens, token_dim]."""
        normalised = (spectrogram - self.mean) / self.std
        return normalised.reshape(spectrogram.shape[0], self.config.tokens, self.config.token_dim)

    def quantise(self, vectors: torch.Tensor) -> torch.Tensor:
        """[..., token_dim] -> the nearest code of each [...]."""
        distances = torch.cdist(vectors.reshape(-1, self.config.token_dim), self.codebook)
        return distances.argmin(dim=-1).reshape(vectors.shape[:-1])

    def encode(self, waveforms: torch.Tensor) -> torch.Tensor:
        """[B, samples] at 16 kHz -> codes [B, tokens]."""
        return self.quantise(self.vectors(self.spectrogram(waveforms)))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, tokens] -> the log-mel frames they stand for [B, tokens * frames_per_token, mel_bins]."""
        frames = self.codebook[codes].reshape(codes.shape[0], -1, self.config.mel_bins)
        return frames * self.std + self.mean
