"""CM3Leon's decoding settings, per-sequence state and next-token scores,
shared by the batched engine and the plain reference path."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pydantic import Field

from patchwork.engines.api import SamplingParams
from patchwork.engines.cm3leon.prompts import Task
from patchwork.engines.cm3leon.tokenizer import EOS, TextTokenizer
from patchwork.engines.generation import Decoding
from patchwork.kernels.guidance import guidance


class Guidance(str, enum.Enum):
    NONE = "none"  # the conditional stream alone
    CLASSIFIER_FREE = "classifier_free"
    CONTRASTIVE = "contrastive"  # CD-K


class Cm3Params(SamplingParams):
    """SamplingParams plus guidance. ``max_new_bytes`` bounds the output's
    text bytes and its tokens (an infill's image codes have no bytes); an
    image is always ``image_tokens`` codes."""

    guidance: Guidance = Guidance.NONE
    # CFG's alpha_c: 1 is the conditional stream alone.
    guidance_scale: float = Field(default=3.0, ge=0.0, le=100.0, allow_inf_nan=False)
    # CD-K's plausibility cut: p_cond(t) >= alpha * (k-th largest p_cond).
    contrastive_alpha: float = Field(default=0.1, gt=0.0, le=1.0)
    contrastive_k: int = Field(default=5, ge=1)

    @property
    def guided(self) -> bool:
        return self.guidance is not Guidance.NONE


@dataclass
class Cm3State:
    """One sequence: its conditional row (and unconditional row when guided)."""

    task: Task
    params: Cm3Params
    uncond: tuple[int, ...]  # the unconditional prompt
    cond_length: int = 0  # positions the conditional row holds
    uncond_length: int = 0
    # Logits after the unconditional prompt, kept until the conditional prompt ends.
    uncond_logits: torch.Tensor | None = None
    generated: list[int] = field(default_factory=list)


def batch_scores(cond: Sequence[torch.Tensor], uncond: Sequence[torch.Tensor | None], params: Sequence[Cm3Params],
                 allowed: Sequence[torch.Tensor]) -> torch.Tensor:
    """Next-token scores [B, V] float32 of B sequences, each from its two
    streams' logits [V] (``uncond`` None when unguided) under its own
    guidance, with what its task may not write (``allowed`` [V] False) at
    -inf: one ``kernels.guidance`` call (one kernel launch on a GPU)."""
    paired = [c if u is None else u for c, u in zip(cond, uncond)]  # an unguided row's stand-in is never read
    guided, _ = guidance(
        torch.stack(list(cond)), torch.stack(paired) if any(u is not None for u in uncond) else None,
        torch.stack(list(allowed)), [p.guidance.value for p in params], [p.guidance_scale for p in params],
        [p.contrastive_alpha for p in params], [p.contrastive_k for p in params],
    )
    return guided


def scores(cond: torch.Tensor, uncond: torch.Tensor | None, params: Cm3Params, allowed: torch.Tensor) -> torch.Tensor:
    """One sequence's next-token scores [V] (see ``batch_scores``)."""
    return batch_scores([cond], [uncond], [params], [allowed])[0]


def record(state: Cm3State, decoding: Decoding, symbol: int, tokenizer: TextTokenizer, image_tokens: int) -> bytes:
    """Records the chosen symbol; returns the output bytes now released. An
    image ends after its last code, text at ``<eos>`` (or its byte budget)."""
    if symbol == EOS and state.task is not Task.IMAGE:
        decoding.end_of_sequence()
        return b""
    state.generated.append(symbol)
    if state.task is Task.IMAGE:
        if len(state.generated) == image_tokens:
            decoding.end_of_sequence()
        return b""
    released = decoding.accept(tokenizer.token_bytes(symbol) if symbol < tokenizer.vocab_size else b"")
    if len(state.generated) >= decoding.params.max_new_bytes:
        decoding.out_of_budget()  # image codes in an infill count as tokens, not bytes
    return released
