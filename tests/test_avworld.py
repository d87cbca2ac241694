"""The procedural audio-video world: deterministic clips whose sound and
frames follow the shape as documented, labels that need both modalities, and
clip directories on disk."""

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from patchwork.engines.wav import read_wav
from patchwork.training.avworld import LABELS, SAMPLE_RATE, AudioVideoWorld, Motion
from patchwork.training.avworld.files import clip_files, write_clip
from patchwork.training.avworld.world import TRAVEL, render_frames, synthesize
from tests.conftest import run_patchwork

REPO = Path(__file__).resolve().parent.parent


def test_clips_are_a_pure_function_of_seed_and_index():
    first, again, other = AudioVideoWorld(seed=2)[5], AudioVideoWorld(seed=2)[5], AudioVideoWorld(seed=3)[5]
    assert first.motion == again.motion and np.array_equal(first.frames, again.frames)
    assert np.array_equal(first.waveform, again.waveform)
    assert [c.motion for c in AudioVideoWorld(seed=2).take(20)] != [c.motion for c in AudioVideoWorld(seed=3).take(20)]
    assert first.frames.shape == (8, 32, 32, 3) and first.frames.dtype == np.uint8
    assert first.waveform.shape == (SAMPLE_RATE,) and first.waveform.dtype == np.float32
    assert np.abs(first.waveform).max() <= 1.0
    assert AudioVideoWorld(frames=4, image_size=64, seconds=0.5)[0].frames.shape == (4, 64, 64, 3)
    with pytest.raises(ValueError, match="frames must be at least 2"):
        AudioVideoWorld(frames=1)
    assert other.label == LABELS.index(other.motion.label)


def test_every_label_occurs_and_labels_need_both_modalities():
    clips = AudioVideoWorld(seed=0).take(400)
    assert {clip.label for clip in clips} == set(range(len(LABELS))) and len(LABELS) == 12
    motion = Motion(kind="square", colour="red", side=9, material="wood", direction="up", speed=2)
    # Another warmth: another label, the same sound.
    recoloured = replace(motion, colour="blue")
    assert recoloured.label != motion.label
    assert np.array_equal(synthesize(motion, 1.0, random.Random(1)), synthesize(recoloured, 1.0, random.Random(1)))
    # Another material: another label, the same frames.
    metal = replace(motion, material="metal")
    assert metal.label != motion.label
    assert np.array_equal(render_frames(motion, (0.3, 0.6), 8, 32), render_frames(metal, (0.3, 0.6), 8, 32))
    assert not np.array_equal(synthesize(motion, 1.0, random.Random(1)), synthesize(metal, 1.0, random.Random(1)))


def _peak_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / SAMPLE_RATE)[spectrum.argmax()])


@pytest.mark.parametrize("side", [6, 10, 14])
def test_the_sound_follows_size_and_speed(side):
    motion = Motion(kind="circle", colour="green", side=side, material="metal", direction="left", speed=1)
    sound = synthesize(motion, 1.0, random.Random(0))
    assert abs(_peak_hz(sound) - motion.pitch) < 5  # a circle is a pure tone at the size's pitch
    assert 880 * 2 ** -2 <= motion.pitch <= 880
    # Strikes: the envelope's peaks per second follow the speed.
    for speed in (1, 3):
        struck = synthesize(replace(motion, speed=speed, material="wood"), 1.0, random.Random(0))
        envelope = np.abs(struck).reshape(-1, 160).max(1)  # 10 ms frames
        onsets = np.sum((envelope[1:] > 0.5 * envelope.max()) & (envelope[:-1] <= 0.5 * envelope.max()))
        assert abs(onsets - replace(motion, speed=speed).strikes_per_second) <= 1


@pytest.mark.parametrize("direction,axis,sign", [("left", 1, -1), ("right", 1, 1), ("up", 0, -1), ("down", 0, 1)])
def test_the_frames_show_the_shape_moving_its_way(direction, axis, sign):
    motion = Motion(kind="square", colour="yellow", side=8, material="wood", direction=direction, speed=3)
    frames = render_frames(motion, (0.5, 0.5), 8, 32)
    centres = [np.argwhere(frame.any(-1)).mean(0) for frame in frames]
    travelled = centres[-1][axis] - centres[0][axis]
    assert abs(travelled - sign * TRAVEL * motion.speed) <= 1
    assert abs(centres[-1][1 - axis] - centres[0][1 - axis]) < 0.5
    for frame in frames:
        rows, cols = np.nonzero(frame.any(-1))
        assert rows.max() - rows.min() + 1 == 8 and cols.max() - cols.min() + 1 == 8  # the whole square, inside


def test_clip_directories_round_trip(tmp_path):
    clips = AudioVideoWorld(seed=1).take(3)
    for clip in clips:
        write_clip(tmp_path, clip)
    found = clip_files(tmp_path)
    assert list(found) == [f"{clip.index:06d}" for clip in clips]
    for clip, (wav, frames) in zip(clips, found.values()):
        samples, rate = read_wav(wav)
        assert rate == SAMPLE_RATE and np.abs(samples - clip.waveform).max() < 1e-4  # 16-bit PCM
        assert len(frames) == 8
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: holds neither audio.wav nor frames"):
        clip_files(tmp_path)


def test_the_world_command_writes_clips_and_refuses_bad_input(tmp_path):
    run = run_patchwork("avworld", "--out", str(tmp_path), "--count", "2",
                        "--start", "7")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000007", "000008"]
    bad = run_patchwork("avworld", "--out", str(tmp_path), "--count", "1",
                        "--start", "-1")
    assert bad.returncode == 2 and "--start must be at least 0" in bad.stderr
