"""The log-mel filterbank every audio model here reads.

MAViL's recipe at 16 kHz: 25 ms Hann windows (400 samples, zero-padded to a
512-point FFT) every 10 ms (160 samples), no centring, the power spectrum
through triangular mel filters (HTK mel scale, 20 Hz to 8 kHz, peak 1), then
the natural log (floored at 1e-10). It equals librosa's
``melspectrogram(..., center=False, htk=True, norm=None)`` (a test holds it
to that).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

WINDOW = 400
HOP = 160
N_FFT = 512
F_MIN, F_MAX = 20.0, 8000.0
LOG_FLOOR = 1e-10


def _hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filters(mel_bins: int, sample_rate: int) -> torch.Tensor:
    """[N_FFT // 2 + 1, mel_bins]: triangles between mel-spaced edges, each
    peaking at 1; made once per setting (every request reads them)."""
    edges = _mel_to_hz(torch.linspace(_hz_to_mel(torch.tensor(F_MIN, dtype=torch.float64)).item(),
                                      _hz_to_mel(torch.tensor(F_MAX, dtype=torch.float64)).item(), mel_bins + 2,
                                      dtype=torch.float64))
    frequencies = torch.linspace(0, sample_rate / 2, N_FFT // 2 + 1, dtype=torch.float64)[:, None]
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (frequencies - lower) / (centre - lower)
    falling = (upper - frequencies) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0).to(torch.float32)


def log_mel(waveform: torch.Tensor, mel_bins: int = 128, sample_rate: int = 16_000) -> torch.Tensor:
    """waveform [..., samples] (at least N_FFT) -> log-mel filterbank [..., frames, mel_bins]."""
    shape = waveform.shape
    spectrum = torch.stft(waveform.reshape(-1, shape[-1]).float(), n_fft=N_FFT, hop_length=HOP, win_length=WINDOW,
                          window=torch.hann_window(WINDOW, periodic=True, device=waveform.device), center=False,
                          return_complex=True)  # [B, N_FFT // 2 + 1, frames]
    power = spectrum.abs().pow(2).transpose(1, 2)
    mel = power @ mel_filters(mel_bins, sample_rate).to(waveform.device)
    return torch.log(mel.clamp(min=LOG_FLOOR)).reshape(*shape[:-1], -1, mel_bins)


def samples_for(frames: int) -> int:
    """Samples whose filterbank has exactly ``frames`` frames."""
    return N_FFT + (frames - 1) * HOP


def fit_frames(spectrogram: torch.Tensor, frames: int, pad_value: float) -> torch.Tensor:
    """[..., T, M] cut or padded (with ``pad_value``) to [..., frames, M]."""
    missing = frames - spectrogram.shape[-2]
    if missing <= 0:
        return spectrogram[..., :frames, :]
    return F.pad(spectrogram, (0, 0, 0, missing), value=pad_value)
