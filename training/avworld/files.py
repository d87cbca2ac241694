"""Clip directories on disk: what ``patchwork index`` reads.

A clip directory holds one sub-directory per clip, named after the clip's
id, with its sound as ``audio.wav`` and its frames as PNG (or JPEG) files,
in the order of their file names. Either may be missing (a silent film, a
sound without a picture), not both.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from patchwork.engines.wav import wav_bytes
from patchwork.training.avworld.world import SAMPLE_RATE, Clip

AUDIO_FILE = "audio.wav"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")


def write_clip(directory: Path, clip: Clip) -> Path:
    """Writes ``clip`` as ``directory/<index>/`` (audio.wav, frame_00.png, ...)."""
    out = Path(directory) / f"{clip.index:06d}"
    out.mkdir(parents=True, exist_ok=True)
    (out / AUDIO_FILE).write_bytes(wav_bytes(clip.waveform, SAMPLE_RATE))
    for i, frame in enumerate(clip.frames):
        Image.fromarray(frame).save(out / f"frame_{i:02d}.png")
    return out


def clip_files(directory: Path) -> dict[str, tuple[bytes | None, list[bytes]]]:
    """Clip id -> (its WAV file or None, its frame files in order), for every
    clip sub-directory; ValueError naming the directory when one holds neither."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    clips = {}
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        audio = sub / AUDIO_FILE
        frames = sorted(p for p in sub.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not audio.is_file() and not frames:
            raise ValueError(f"{sub}: holds neither {AUDIO_FILE} nor frames ({', '.join(FRAME_SUFFIXES)})")
        clips[sub.name] = (audio.read_bytes() if audio.is_file() else None, [p.read_bytes() for p in frames])
    if not clips:
        raise ValueError(f"{directory}: no clip directories")
    return clips

