"""MAViL's inputs: the log-mel filterbank against librosa's, patches and
tubelets, frame sampling, WAV files and resampling."""

import io
import wave

import librosa
import numpy as np
import pytest
import torch

from patchwork.engines.filterbank import log_mel, samples_for
from patchwork.engines.mavil.config import AudioInput, VideoInput
from patchwork.engines.mavil.features import audio_patches, pick_frames, spectrogram_patches, tubelets, video_tubelets
from patchwork.engines.wav import MediaError, read_wav, resample, wav_bytes


def _noisy_chirp(seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(0)
    return (0.5 * np.sin(2 * np.pi * (300 + 2000 * t) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


# At a 512-point FFT the lowest of 128 mel filters are narrower than one frequency bin (the paper's recipe).
@pytest.mark.filterwarnings("ignore:Empty filters detected")
def test_the_filterbank_is_librosas():
    samples = _noisy_chirp()
    mine = log_mel(torch.from_numpy(samples)).numpy()
    theirs = librosa.feature.melspectrogram(
        y=samples.astype(np.float64), sr=16000, n_fft=512, hop_length=160, win_length=400, window="hann",
        center=False, power=2.0, n_mels=128, fmin=20.0, fmax=8000.0, htk=True, norm=None)
    theirs = np.log(np.maximum(theirs, 1e-10)).T
    assert mine.shape == theirs.shape == (97, 128)  # 25 ms windows every 10 ms over 1 s
    assert np.abs(mine - theirs).max() < 2e-3
    batched = log_mel(torch.from_numpy(np.stack([samples, samples[::-1].copy()])))
    assert torch.allclose(batched[0], torch.from_numpy(mine), atol=1e-5)


def test_patches_and_tubelets_are_the_blocks_they_say():
    spectrogram = torch.arange(2 * 32 * 48, dtype=torch.float32).reshape(2, 32, 48)
    patches = spectrogram_patches(spectrogram, 16)  # [2, 2 * 3, 256]
    assert patches.shape == (2, 6, 256)
    assert torch.equal(patches[1, 4].reshape(16, 16), spectrogram[1, 16:32, 16:32])  # time block 1, mel block 1
    video = torch.randn(1, 4, 16, 24, 3)
    tubes = tubelets(video, 2, 8)  # [1, 2 * 2 * 3, 2 * 8 * 8 * 3]
    assert tubes.shape == (1, 12, 384)
    assert torch.equal(tubes[0, 6 + 3 + 2].reshape(2, 8, 8, 3), video[0, 2:4, 8:16, 16:24])


def test_each_audio_window_reads_the_frames_of_its_span():
    from patchwork.engines.mavil.engine import window_frames

    frames = np.arange(10).reshape(10, 1, 1, 1) * np.ones((1, 2, 2, 3))
    # 2.5 clips of sound in three windows (starting at 0, 0.75 and 1.5 clips); 10 frames over it.
    parts = window_frames(10, [0, 3, 6], 4, 10, frames)
    assert [part[:, 0, 0, 0].tolist() for part in parts] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    # Fewer frames than windows: each window reads the frame nearest its middle.
    assert [part[:, 0, 0, 0].tolist() for part in window_frames(1, [0, 3, 6], 4, 10, frames[:1])] == [[0]] * 3
    assert window_frames(10, [0], 4, 3, frames) == [frames]


def test_frames_are_picked_evenly():
    assert pick_frames(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert pick_frames(8, 8) == list(range(8))
    assert pick_frames(2, 4) == [0, 0, 1, 1]
    frames = torch.rand(1, 3, 64, 48, 3)
    assert video_tubelets(frames, VideoInput(frames=8, image_size=32)).shape == (1, 64, 384)


def test_short_audio_is_padded_with_the_quietest_level_training_heard():
    from patchwork.training.avworld import AudioVideoWorld
    from patchwork.training.mavil.train import filterbank_statistics

    audio = filterbank_statistics(AudioVideoWorld(seconds=0.5).take(64), AudioInput(mel_bins=64, frames=32, patch=16,
                                                                                     seconds=0.5))
    clip = torch.from_numpy(_noisy_chirp(0.5))
    whole = log_mel(clip[None, :4000], audio.mel_bins)  # [1, 23, 64]: the frames the sound has
    grid = audio_patches(clip[None, :4000], audio).reshape(1, 2, 4, 16, 16).permute(0, 1, 3, 2, 4).reshape(1, 32, 64)
    assert torch.allclose(grid[0, :whole.shape[1]], (whole[0] - audio.mean) / audio.std, atol=1e-5)
    padding = grid[0, whole.shape[1]:]
    assert torch.allclose(padding, torch.full_like(padding, (audio.floor - audio.mean) / audio.std))
    # In the distribution the encoder was trained on: digital silence lies far below it.
    assert -3 < padding[0, 0] < -1
    silent = AudioInput(**{**audio.model_dump(), "floor": None})
    assert audio_patches(clip[None, :4000], silent).reshape(-1)[-1] < -5
    with pytest.raises(ValueError, match="need 5472 samples, more than 0.3 s"):
        AudioInput(mel_bins=64, frames=32, patch=16, seconds=0.3)
    assert samples_for(32) == 5472


def _pcm_wav(samples: np.ndarray, rate: int, width: int, channels: int = 1) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


def test_wav_files_of_every_common_kind_are_read():
    tone = _noisy_chirp(0.1)
    assert np.abs(read_wav(wav_bytes(tone, 16000))[0] - tone).max() < 1e-4
    pcm16 = np.round(tone * 32767).astype("<i2")
    stereo = np.stack([pcm16, np.zeros_like(pcm16)], axis=1)  # the right channel silent
    samples, rate = read_wav(_pcm_wav(stereo, 22050, 2, channels=2))
    assert rate == 22050 and np.abs(samples - tone / 2).max() < 1e-4
    unsigned = np.round(tone * 127 + 128).astype(np.uint8)
    assert np.abs(read_wav(_pcm_wav(unsigned, 8000, 1))[0] - tone).max() < 0.02
    for garbage in (b"", b"RIFF0000WAVEjunk", b"not a wav file at all"):
        with pytest.raises(MediaError, match="not a readable WAV file"):
            read_wav(garbage)


def test_resampling_keeps_the_pitch_and_the_duration():
    rate = 44100
    t = np.arange(rate // 2) / rate
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    resampled = resample(tone, rate)
    assert len(resampled) == 8000 and resampled.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(resampled))
    assert abs(np.fft.rfftfreq(len(resampled), 1 / 16000)[spectrum.argmax()] - 1000) <= 2
    # What lies above the new Nyquist frequency is filtered out, not folded back
    # (away from the edges, where the filter meets the clip's ends).
    alias = resample(np.sin(2 * np.pi * 12000 * t).astype(np.float32), rate)
    assert np.abs(alias[50:-50]).max() < 0.01
    assert np.array_equal(resample(tone[:10], 16000), tone[:10])  # already 16 kHz: unchanged
    for bad in (1000, 400000):
        with pytest.raises(MediaError, match=f"sample rate {bad} Hz"):
            resample(tone, bad)
