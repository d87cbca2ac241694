"""Sounds that cross the wire: WAV files (``engines.wav``) or raw samples,
checked and resampled to 16 kHz. Every failure is an ``InvalidArgument``
naming the request field."""

from __future__ import annotations

import numpy as np

from patchwork.engines.wav import SAMPLE_RATE, MediaError, read_wav, resample
from patchwork.serving.config import Limits
from patchwork.serving.validation import InvalidArgument


def checked_sound(samples: np.ndarray, rate: int, field: str, limits: Limits, rate_field: str | None = None) -> np.ndarray:
    """float32 samples at ``rate`` -> at 16 kHz, after checking they exist,
    are finite and last at most ``limits.max_audio_seconds``; a bad rate is
    blamed on ``rate_field`` (default: ``field``)."""
    if not len(samples):
        raise InvalidArgument(field, "holds no samples")
    if not np.isfinite(samples).all():
        raise InvalidArgument(field, "holds NaN or infinite samples (as float32)")
    if len(samples) > limits.max_audio_seconds * max(rate, 1):
        raise InvalidArgument(field, f"{len(samples) / max(rate, 1):.2f} s; at most {limits.max_audio_seconds:g} s")
    try:
        return resample(samples, rate, SAMPLE_RATE)
    except MediaError as e:
        raise InvalidArgument(rate_field or field, str(e)) from None


def read_sound(data: bytes, field: str, limits: Limits) -> np.ndarray:
    """A WAV file -> float32 mono samples at 16 kHz."""
    if len(data) > limits.max_clip_bytes:
        raise InvalidArgument(field, f"{len(data)} bytes is over the limit of {limits.max_clip_bytes}")
    try:
        samples, rate = read_wav(data)
    except MediaError as e:
        raise InvalidArgument(field, str(e)) from None
    return checked_sound(samples, rate, field, limits)
