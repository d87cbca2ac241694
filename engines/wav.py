"""Sound as it arrives: WAV files in and out, and resampling to the rate
every audio model here reads (16 kHz).

WAV files are read with SciPy: PCM of 8, 16, 24 or 32 bits or IEEE float,
any number of channels (averaged to mono). Other rates are resampled with
``scipy.signal.resample_poly``: polyphase filtering by the reduced ratio of
the two rates with a Kaiser-windowed low-pass FIR (SciPy's default, beta 5),
which removes what lies above the new Nyquist frequency before decimating.
"""

from __future__ import annotations

import io
from math import gcd

import numpy as np
from scipy import signal
from scipy.io import wavfile

SAMPLE_RATE = 16_000
# Rates accepted for resampling (Hz).
MIN_RATE, MAX_RATE = 4_000, 192_000


class MediaError(ValueError):
    """Input that cannot be read as sound; the caller names the field."""


_SCALE = {np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """A WAV file -> (float32 mono samples in [-1, 1], its sample rate)."""
    try:
        rate, samples = wavfile.read(io.BytesIO(data))
    except (ValueError, EOFError, OSError, IndexError) as e:
        raise MediaError(f"not a readable WAV file ({e})") from None
    if samples.dtype == np.uint8:
        samples = (samples.astype(np.float32) - 128.0) / 128.0
    elif samples.dtype in _SCALE:
        samples = samples.astype(np.float32) / _SCALE[samples.dtype]
    elif samples.dtype.kind == "f":
        samples = samples.astype(np.float32)
    else:
        raise MediaError(f"unsupported WAV sample type {samples.dtype}")
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    return samples, int(rate)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """float samples in [-1, 1] -> a 16-bit PCM mono WAV file."""
    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32767), -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    wavfile.write(buffer, rate, pcm)
    return buffer.getvalue()


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """float32 samples at ``rate`` -> at ``target`` (see the module's docstring)."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise MediaError(f"sample rate {rate} Hz; expected {MIN_RATE} to {MAX_RATE}")
    if rate == target:
        return samples.astype(np.float32, copy=False)
    common = gcd(rate, target)
    return signal.resample_poly(samples, target // common, rate // common).astype(np.float32)
