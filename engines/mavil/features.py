"""What the MAViL encoders read: log-mel filterbanks (``engines.filterbank``)
cut into spectrogram patches, and frames cut into tubelets."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from patchwork.engines.filterbank import LOG_FLOOR, fit_frames, log_mel

if TYPE_CHECKING:
    from patchwork.engines.mavil.config import AudioInput, VideoInput


def spectrogram_patches(spectrogram: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, T, M] -> [B, (T / patch) * (M / patch), patch * patch], time-major."""
    batch, time, mels = spectrogram.shape
    grid = spectrogram.reshape(batch, time // patch, patch, mels // patch, patch)
    return grid.permute(0, 1, 3, 2, 4).reshape(batch, -1, patch * patch)


def tubelets(video: torch.Tensor, frames_per_tube: int, patch: int) -> torch.Tensor:
    """[B, F, H, W, C] -> [B, (F / t) * (H / p) * (W / p), t * p * p * C], time-major."""
    batch, frames, height, width, channels = video.shape
    grid = video.reshape(batch, frames // frames_per_tube, frames_per_tube, height // patch, patch,
                         width // patch, patch, channels)
    return grid.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(batch, -1, frames_per_tube * patch * patch * channels)


def pick_frames(count: int, wanted: int) -> list[int]:
    """Indices of ``wanted`` frames spread evenly over ``count`` (repeating frames when there are fewer)."""
    return [min(count - 1, math.floor((i + 0.5) * count / wanted)) for i in range(wanted)]


def resize_frames(video: torch.Tensor, size: int) -> torch.Tensor:
    """[F, H, W, C] (float) -> [F, size, size, C] by area averaging, unless already that size."""
    if video.shape[1:3] == (size, size):
        return video
    return F.interpolate(video.permute(0, 3, 1, 2), size=(size, size), mode="area").permute(0, 2, 3, 1)


def audio_patches(waveforms: torch.Tensor, audio: AudioInput) -> torch.Tensor:
    """Waveforms [B, samples] at 16 kHz (at least one 25 ms window) -> normalised
    spectrogram patches [B, Na, patch * patch]: the first ``audio.frames``
    filterbank frames, the frames a shorter sound lacks set to ``audio.floor``."""
    pad = audio.floor if audio.floor is not None else math.log(LOG_FLOOR)
    spectrogram = fit_frames(log_mel(waveforms, audio.mel_bins, audio.sample_rate), audio.frames, pad)
    return spectrogram_patches((spectrogram - audio.mean) / audio.std, audio.patch)


def video_tubelets(frames: torch.Tensor, video: VideoInput) -> torch.Tensor:
    """Frames [B, F, H, W, 3] in [0, 1] (any count and size) -> tubelets
    [B, Nv, t * p * p * 3]: frames picked evenly to ``video.frames``, resized
    to ``video.image_size``, scaled to [-1, 1]."""
    picked = frames[:, pick_frames(frames.shape[1], video.frames)]
    resized = torch.stack([resize_frames(clip, video.image_size) for clip in picked])
    return tubelets(resized * 2 - 1, video.tubelet_frames, video.patch)
