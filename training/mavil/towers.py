"""The supervised tower check: can each encoder, as a preset builds it, learn
to read what its modality carries?

A fresh audio encoder and a fresh video encoder of the preset's shape (with
its input settings) are each trained directly on the attribute labels
(``training.mavil.attributes``: one linear head per attribute on the
mean-pooled tokens, the sum of their cross-entropies), then scored on
held-out clips. Self-supervised training can only find what an encoder is
able to represent, so a tower that fails here caps every later number
(retrieval above all): this check is the first thing to run when changing
the encoders or their inputs, and it takes about a minute on two cores.

An encoder passes when speed, direction and glide reach ``MOTION_ACCURACY``,
size reaches ``SIZE_ACCURACY`` (nine sides, one pixel apart, heard as nine
pitches) and every other attribute (kind, colour, material) ``ACCURACY``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from patchwork.engines.mavil.config import MavilConfig
from patchwork.engines.mavil.model import MavilModel
from patchwork.training.avworld import AudioVideoWorld
from patchwork.training.loop import Schedule, fit
from patchwork.training.mavil.attributes import classes, labels
from patchwork.training.mavil.presets import MavilPreset
from patchwork.training.mavil.train import HELDOUT_START, encoder_inputs, filterbank_statistics

MOTION_ACCURACY = 0.9
SIZE_ACCURACY = 0.5
ACCURACY = 0.75


class TowerCheck(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train_clips: int = Field(default=2000, ge=2)
    heldout_clips: int = Field(default=256, ge=2)
    schedule: Schedule = Schedule(steps=600, batch_size=128, lr=2e-3, warmup_fraction=0.1)


def required(attribute: str) -> float:
    if attribute == "size":
        return SIZE_ACCURACY
    return MOTION_ACCURACY if attribute in ("speed", "direction", "glide") else ACCURACY


def check_towers(preset: MavilPreset, check: TowerCheck | None = None, seed: int = 0,
                 modalities: tuple[str, ...] = ("audio", "video")) -> dict[str, dict[str, float]]:
    """Held-out accuracy of each attribute, per modality, after supervised training of a fresh encoder."""
    check = check or TowerCheck()
    config = MavilConfig(audio=preset.audio, video=preset.video, audio_encoder=preset.audio_encoder,
                         video_encoder=preset.video_encoder, fusion=preset.fusion, embed_dim=preset.embed_dim)
    world = AudioVideoWorld(seed=preset.world_seed, frames=config.video.frames, image_size=config.video.image_size,
                            seconds=config.audio.seconds)
    train_clips, heldout_clips = world.take(check.train_clips), world.take(check.heldout_clips, start=HELDOUT_START)
    # The towers read spectrograms normalised as training normalises them.
    config = config.model_copy(update={"audio": filterbank_statistics(train_clips, config.audio)})
    train, heldout = encoder_inputs(train_clips, config), encoder_inputs(heldout_clips, config)
    results = {}
    for modality in modalities:
        torch.manual_seed(seed)
        model = MavilModel(config)
        encode = model.encode_audio if modality == "audio" else model.encode_video
        heads = nn.ModuleDict({name: nn.Linear(config.dim, count) for name, count in classes(modality).items()})
        train_inputs, heldout_inputs = getattr(train, modality), getattr(heldout, modality)
        train_labels, heldout_labels = labels(train_clips, modality), labels(heldout_clips, modality)
        generator = torch.Generator().manual_seed(seed)

        def next_batch() -> torch.Tensor:
            return torch.randint(len(train_inputs), (check.schedule.batch_size,), generator=generator)

        def loss_of(picks: torch.Tensor) -> torch.Tensor:
            pooled = encode(train_inputs[picks])[0].mean(1)
            return sum(F.cross_entropy(head(pooled), train_labels[name][picks]) for name, head in heads.items())

        model.train()
        parts = tuple(f"{modality}_{part}" for part in ("embed", "places", "encoder", "norm"))
        tower = [p for name, p in model.named_parameters() if name.startswith(parts)]
        fit([*tower, *heads.parameters()], loss_of, next_batch, check.schedule, f"{modality} tower")
        model.eval()
        with torch.no_grad():
            pooled = encode(heldout_inputs)[0].mean(1)
            results[modality] = {name: (head(pooled).argmax(1) == heldout_labels[name]).float().mean().item()
                                 for name, head in heads.items()}
    return results


def failures(results: dict[str, dict[str, float]]) -> list[str]:
    """'modality attribute accuracy < required' for every attribute under its bar."""
    return [f"{modality} {name} {accuracy:.3f} < {required(name)}"
            for modality, accuracies in results.items() for name, accuracy in accuracies.items()
            if accuracy < required(name)]
