"""Training a MAViL checkpoint on the procedural audio-video world.

Stage 1: the encoders, from random weights, with masked reconstruction of
both inputs and inter- and intra-modal InfoNCE on masked inputs
(``training.mavil.objective``); ``objective`` keeps only one of the two
for the ablations. Stage 2: a new student, from random weights, regresses a
frozen stage-1 teacher's fused features of the whole clip from masked
inputs (with the same contrastive terms); it reads the teacher's input
settings (patches and filterbank statistics).

Then, for either stage: a linear head per embedding (audio, video, fused)
is trained on the frozen encoder over the training clips and stored with the
checkpoint; the held-out probe accuracies and audio<->video retrieval recall
are the checkpoint's metrics; and the held-out clips become the checkpoint's
retrieval index ``heldout`` (clip ids are the world indices, as
``patchwork avworld`` names its clip directories).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from patchwork.engines.checkpoint import TrainingRecord, add_assets, save_checkpoint
from patchwork.engines.filterbank import fit_frames, log_mel
from patchwork.engines.loading import load
from patchwork.engines.mavil.config import AudioInput, MavilConfig
from patchwork.engines.mavil.engine import Clip as EngineClip
from patchwork.engines.mavil.engine import load_mavil
from patchwork.engines.mavil.features import audio_patches, video_tubelets
from patchwork.engines.mavil.index import asset_name, to_json
from patchwork.engines.mavil.model import MODALITIES, MavilModel
from patchwork.training.avworld import LABELS, AudioVideoWorld, Clip
from patchwork.training.loop import fit
from patchwork.training.mavil.index import build_index
from patchwork.training.mavil.objective import Batch, TrainingHeads, stage_one_loss, stage_two_loss, teacher_targets
from patchwork.training.mavil.presets import MavilPreset
from patchwork.training.mavil.probe import clip_embeddings, linear_probe, retrieval_recall

# Held-out clips come from indices no training run reaches.
HELDOUT_START = 10_000_000
DEFAULT_INDEX = "heldout"


def clip_id(clip: Clip) -> str:
    return f"{clip.index:06d}"


def filterbank_statistics(clips: list[Clip], audio: AudioInput) -> AudioInput:
    """``audio`` with the mean and deviation of the training clips' log-mel
    filterbanks (what normalises the encoder's input) and their 1st percentile
    (what a shorter sound is padded with)."""
    waveforms = torch.from_numpy(np.stack([clip.waveform for clip in clips[:512]]))
    spectrogram = fit_frames(log_mel(waveforms, audio.mel_bins, audio.sample_rate), audio.frames, 0.0)
    return audio.model_copy(update={"mean": spectrogram.mean().item(), "std": spectrogram.std().item(),
                                    "floor": spectrogram.flatten().quantile(0.01).item()})


def encoder_inputs(clips: list[Clip], config: MavilConfig, chunk: int = 256) -> Batch:
    """Every clip's spectrogram patches and tubelets, as the engine makes them."""
    audio, video = [], []
    for start in range(0, len(clips), chunk):
        part = clips[start:start + chunk]
        audio.append(audio_patches(torch.from_numpy(np.stack([c.waveform for c in part])), config.audio))
        frames = torch.from_numpy(np.stack([c.frames for c in part])).float() / 255
        video.append(video_tubelets(frames, config.video))
    return Batch(torch.cat(audio), torch.cat(video))


def probe_and_heads(model: MavilModel, train_embeddings: dict[str, torch.Tensor], train_labels: torch.Tensor,
                    heldout_embeddings: dict[str, torch.Tensor], heldout_labels: torch.Tensor,
                    steps: int) -> dict[str, float]:
    """Trains the linear heads into ``model`` on its ``clip_embeddings`` of the
    training clips and returns the held-out metrics."""
    metrics = {}
    for modality in MODALITIES:
        accuracy, weight, bias = linear_probe(train_embeddings[modality], train_labels, heldout_embeddings[modality],
                                              heldout_labels, len(LABELS), steps)
        metrics[f"probe_{modality}_accuracy"] = accuracy
        with torch.no_grad():
            model.heads[modality].weight.copy_(weight)
            model.heads[modality].bias.copy_(bias)
    metrics.update(retrieval_recall(heldout_embeddings["shared_audio"], heldout_embeddings["shared_video"]))
    return metrics


def load_teacher(path: Path) -> MavilModel:
    engine = load_mavil(path, device="cpu", dtype=torch.float32)
    engine.close()
    return engine.model.requires_grad_(False)


def train_mavil(preset: MavilPreset, out: Path, command: str, stage: int = 1, teacher: Path | None = None,
                objective: str = "full", steps: int | None = None) -> dict[str, float]:
    """Trains one stage and writes the checkpoint (with its index) to ``out``; returns its metrics."""
    started = time.monotonic()
    torch.manual_seed(preset.seed)
    generator = torch.Generator().manual_seed(preset.seed)
    schedule = preset.schedule if steps is None else preset.schedule.model_copy(update={"steps": steps})
    teacher_model = load_teacher(teacher) if stage == 2 else None
    audio, video = preset.audio, preset.video
    if teacher_model is not None:
        audio, video = teacher_model.config.audio, teacher_model.config.video
    world = AudioVideoWorld(seed=preset.world_seed, frames=video.frames, image_size=video.image_size,
                            seconds=audio.seconds)
    train_clips = world.take(preset.train_clips)
    heldout_clips = world.take(preset.heldout_clips, start=HELDOUT_START)
    if teacher_model is None:
        audio = filterbank_statistics(train_clips, audio)
    config = MavilConfig(audio=audio, video=video, audio_encoder=preset.audio_encoder,
                         video_encoder=preset.video_encoder, fusion=preset.fusion, embed_dim=preset.embed_dim,
                         labels=list(LABELS), stage=stage)
    model = MavilModel(config)
    train, heldout = encoder_inputs(train_clips, config), encoder_inputs(heldout_clips, config)
    train_labels = torch.tensor([clip.label for clip in train_clips])
    heldout_labels = torch.tensor([clip.label for clip in heldout_clips])

    if teacher_model is None:
        heads = TrainingHeads(model, preset, config.audio.patch_values, config.video.patch_values)

        def loss_of(picks: torch.Tensor) -> torch.Tensor:
            batch = Batch(train.audio[picks], train.video[picks])
            return sum(stage_one_loss(model, heads, batch, preset, generator, objective).values())
    else:
        heads = TrainingHeads(model, preset, teacher_model.config.dim, teacher_model.config.dim)
        targets = teacher_targets(teacher_model, train)  # [clips, Na + Nv, teacher dim]

        def loss_of(picks: torch.Tensor) -> torch.Tensor:
            batch = Batch(train.audio[picks], train.video[picks])
            return sum(stage_two_loss(model, heads, targets[picks], batch, preset, generator).values())

    def next_batch() -> torch.Tensor:
        """The training clips of one step."""
        return torch.randint(len(train_clips), (schedule.batch_size,), generator=generator)

    model.train()
    fit([*model.parameters(), *heads.parameters()], loss_of, next_batch, schedule, f"mavil stage {stage}")
    model.eval()
    metrics = probe_and_heads(model, clip_embeddings(model, train), train_labels, clip_embeddings(model, heldout),
                              heldout_labels, preset.probe_steps)
    metrics["parameters"] = float(sum(p.numel() for p in model.parameters()))
    metrics["train_seconds"] = time.monotonic() - started
    data = {"avworld": {"seed": preset.world_seed, "frames": video.frames, "image_size": video.image_size,
                        "seconds": audio.seconds, "train_clips": len(train_clips),
                        "heldout_clips": len(heldout_clips), "heldout_start": HELDOUT_START},
            "stage": stage, "objective": objective if stage == 1 else "distillation"}
    if teacher is not None:
        data["teacher"] = str(teacher)
    save_checkpoint(out, config, model.state_dict(), TrainingRecord(command=command, data=data, metrics=metrics))
    engine = load(out)
    try:
        clips = {clip_id(clip): EngineClip(clip.waveform, clip.frames.astype(np.float32) / 255)
                 for clip in heldout_clips}
        index = build_index(engine, DEFAULT_INDEX, clips)
    finally:
        engine.close()
    add_assets(out, {asset_name(DEFAULT_INDEX): to_json(index)})
    return metrics
