"""Training a BLT checkpoint.

1. Train the entropy model (a small causal byte LM) on the byte corpus.
2. Calibrate the entropy threshold so that held-out text is cut into patches
   of the target average size.
3. Train the local encoder, global model and local decoder on entropy
   patches, with the entropy model frozen.
4. Measure held-out bits per byte and write the checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from patchwork.engines.blt.config import BltConfig
from patchwork.engines.blt.model import BltModel
from patchwork.engines.blt.patching import patch_ids_from_starts, patch_starts
from patchwork.engines.checkpoint import TrainingRecord, save_checkpoint
from patchwork.kernels.entropy import entropies_from_logits
from patchwork.training.blt.corpus import ByteCorpus
from patchwork.training.blt.presets import BltPreset, WindowSchedule
from patchwork.training.data import bits, random_windows, spread_windows
from patchwork.training.loop import fit


def entropy_model_loss(model: BltModel, windows: torch.Tensor) -> torch.Tensor:
    logits = model.entropy_model(windows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


def blt_loss(model: BltModel, windows: torch.Tensor) -> torch.Tensor:
    inputs, targets = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        starts, _ = model.patch(inputs)
    logits = model(inputs, patch_ids_from_starts(starts))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@torch.no_grad()
def heldout_entropies(model: BltModel, windows: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Next-byte entropies of the held-out windows' inputs: [n, T]."""
    return torch.cat(
        [entropies_from_logits(model.entropy_model(chunk[:, :-1])) for chunk in windows.split(batch_size)]
    )


def average_patch_length(starts: torch.Tensor) -> float:
    """Bytes per patch over positions 1..T of start masks [n, T + 1] (the BOS
    patch at position 0 is not text)."""
    text_starts = starts[:, 1:]
    return text_starts.numel() / max(1, int(text_starts.sum()))


def calibrate_threshold(model: BltModel, windows: torch.Tensor, target: float) -> tuple[float, float]:
    """Bisects the entropy threshold until held-out patches average ``target``
    bytes (as near as the entropies allow). Returns (threshold, achieved)."""
    entropies = heldout_entropies(model, windows)
    inputs = windows[:, :-1]
    patching = model.cfg.patching

    def achieved(threshold: float) -> float:
        cfg = patching.model_copy(update={"threshold": threshold})
        return average_patch_length(patch_starts(inputs, entropies, cfg))

    low, high = 0.0, float(entropies.max()) + 1e-3
    for _ in range(40):
        middle = (low + high) / 2
        if achieved(middle) < target:
            low = middle
        else:
            high = middle
    threshold = min((low, high), key=lambda t: abs(achieved(t) - target))
    return threshold, achieved(threshold)


@torch.no_grad()
def heldout_bits_per_byte(loss_of: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor) -> float:
    losses = [loss_of(chunk) * chunk[:, 1:].numel() for chunk in windows.split(16)]
    return bits(float(sum(losses)) / windows[:, 1:].numel())


def train_blt(
    preset: BltPreset,
    corpus: ByteCorpus,
    out: Path,
    command: str,
    steps: int | None = None,
    target_patch_size: float | None = None,
) -> dict[str, float]:
    """Runs the whole recipe and writes the checkpoint to ``out``; returns its metrics."""
    started = time.monotonic()
    torch.manual_seed(preset.seed)
    generator = torch.Generator().manual_seed(preset.seed)
    target = target_patch_size or preset.target_patch_size
    entropy_schedule, blt_schedule = preset.entropy_schedule, preset.blt_schedule
    if steps is not None:
        entropy_schedule = entropy_schedule.model_copy(update={"steps": steps})
        blt_schedule = blt_schedule.model_copy(update={"steps": steps})

    config: BltConfig = preset.model
    model = BltModel(config)
    model.init_weights(generator=torch.Generator().manual_seed(preset.seed))
    heldout = spread_windows(corpus.heldout, blt_schedule.seq_len + 1, preset.eval_windows)

    def windows_of(schedule: WindowSchedule) -> Callable[[], torch.Tensor]:
        return lambda: random_windows(corpus.train, schedule.batch_size, schedule.seq_len + 1, generator)

    def show(loss: float) -> dict[str, str]:
        return {"bits_per_byte": f"{bits(loss):.3f}"}

    model.train()
    fit(model.entropy_model.parameters(), lambda w: entropy_model_loss(model, w), windows_of(entropy_schedule),
        entropy_schedule, "entropy model", show)
    model.eval()
    entropy_bpb = heldout_bits_per_byte(lambda w: entropy_model_loss(model, w), heldout)

    threshold, calibrated = calibrate_threshold(model, heldout, target)
    config = config.model_copy(update={"patching": config.patching.model_copy(update={"threshold": threshold})})
    model.cfg = config
    tqdm.write(f"entropy threshold {threshold:.4f} nats -> {calibrated:.2f} bytes per patch on held-out text")

    model.entropy_model.requires_grad_(False)
    model.train()
    fit(model.parameters(), lambda w: blt_loss(model, w), windows_of(blt_schedule), blt_schedule, "blt", show)
    model.eval()
    metrics = {
        "heldout_bits_per_byte": heldout_bits_per_byte(lambda w: blt_loss(model, w), heldout),
        "entropy_model_heldout_bits_per_byte": entropy_bpb,
        "heldout_unigram_bits_per_byte": corpus.unigram_bits_per_byte(),
        "average_patch_length": calibrated,
        "target_patch_size": target,
        "patching_threshold": threshold,
        "parameters": float(sum(p.numel() for p in model.parameters())),
        "train_seconds": time.monotonic() - started,
    }
    record = TrainingRecord(
        command=command,
        data={**corpus.description, "heldout_eval": {"windows": len(heldout), "window_bytes": heldout.shape[1]}},
        metrics=metrics,
    )
    save_checkpoint(out, config, model.state_dict(), record)
    return metrics
