"""The optimisation loop every family's trainer shares: AdamW with linear
warm-up and cosine decay, gradient clipping, and a progress bar."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from tqdm import tqdm


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int
    batch_size: int
    lr: float
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01


def lr_at(step: int, schedule: Schedule) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    warmup = max(1, int(schedule.steps * schedule.warmup_fraction))
    if step < warmup:
        return schedule.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, schedule.steps - warmup)
    return schedule.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(
    parameters: Iterable[nn.Parameter],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    next_batch: Callable[[], torch.Tensor],
    schedule: Schedule,
    description: str,
    show: Callable[[float], dict[str, str]] = lambda loss: {"loss": f"{loss:.3f}"},
    on_step: Callable[[int], None] | None = None,
) -> float:
    """``schedule.steps`` AdamW steps, each on ``loss_of(next_batch())``; the
    progress bar shows ``show(loss)``; ``on_step(step)`` runs after each step
    (the study's evaluations). Returns the last step's loss."""
    params = [p for p in parameters if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, betas=(0.9, 0.95), weight_decay=schedule.weight_decay)
    loss = torch.tensor(float("nan"))
    with tqdm(range(schedule.steps), desc=description, unit="step", dynamic_ncols=True) as bar:
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, schedule)
            loss = loss_of(next_batch())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            if step % 10 == 0 or step == schedule.steps - 1:
                bar.set_postfix(show(loss.item()))
            if on_step is not None:
                on_step(step)
    return float(loss.detach())
