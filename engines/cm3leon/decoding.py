"""CM3Leon's decoding settings, per-sequence state and next-token scores,
shared by the batched engine and the plain reference path.

A request names only the settings it wants; every other one comes from the
model's defaults for the kind of output (``DecodingDefaults``): for images,
the decoding the evaluation measured best on this checkpoint (recorded in its
manifest by ``patchwork eval cm3leon``), else the family's measured best
(``FAMILY_DEFAULTS``); for text (captions and infills), greedy and unguided.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, Field

from patchwork.engines.api import InvalidRequest, SamplingParams
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


class DecodingDefaults(BaseModel):
    """What a request gets for each decoding setting it leaves unset, for one
    kind of output, and why these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    guidance: Guidance
    guidance_scale: float = Field(default=3.0, ge=0.0, le=100.0)
    temperature: float = Field(ge=0.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    contrastive_alpha: float = Field(default=0.1, gt=0.0, le=1.0)
    contrastive_k: int = Field(default=5, ge=1)
    # Retrieved documents; None takes the model config's ``retrieval.default_documents``.
    documents: int | None = Field(default=None, ge=0)
    chosen_by: str


# Kinds of output with defaults of their own: an image's codes; a caption's or an infill's text.
OUTPUTS = ("image", "text")

# Without an evaluation of its own, a checkpoint takes these: for images, the
# best mode measured on the default preset (docs/cm3leon.md: CD-K with K 1,
# alpha 0.3 and top-p 0.9, attribute accuracy 0.583 with no retrieved document,
# as with one); text as measured there.
FAMILY_DEFAULTS = {
    "image": DecodingDefaults(guidance=Guidance.CONTRASTIVE, contrastive_alpha=0.3, contrastive_k=1, temperature=1.0,
                              top_p=0.9, documents=0, chosen_by="family: CD-K a=0.3 K=1, top-p 0.9, no documents "
                              "(the default preset's best measured mode)"),
    "text": DecodingDefaults(guidance=Guidance.NONE, temperature=0.0, chosen_by="family: greedy, unguided"),
}

# The request's guidance that splits samples between CFG and CD-K.
MIXED = "mixed"


def sample_params(defaults: DecodingDefaults, explicit: dict, samples: int, max_new_bytes: int) -> list[Cm3Params]:
    """Each sample's ``Cm3Params``: the request's ``explicit`` settings
    (``Cm3Params`` fields, ``guidance`` possibly ``MIXED``) over ``defaults``;
    sample i is seeded ``seed + i``; ``MIXED`` draws the first half with
    classifier-free guidance and the rest with CD-K. Greedy decoding of more
    than one sample is refused: every sample would be the same."""
    settings = {**defaults.model_dump(exclude={"documents", "chosen_by"}), **explicit}
    if samples > 1 and settings["temperature"] == 0:
        raise InvalidRequest("decoding.temperature", f"0 (greedy) makes all {samples} samples the same; "
                             "sample with a temperature above 0, or ask for one sample")
    seed, guidance = settings.pop("seed", 0), settings.pop("guidance")
    params = []
    for i in range(samples):
        chosen = guidance if guidance != MIXED else (
            Guidance.CLASSIFIER_FREE if i < (samples + 1) // 2 else Guidance.CONTRASTIVE)
        params.append(Cm3Params(**settings, guidance=chosen, seed=(seed + i) % 2**64, max_new_bytes=max_new_bytes))
    return params


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


def batch_scores(cond: torch.Tensor, uncond: torch.Tensor | None, params: Sequence[Cm3Params],
                 allowed: torch.Tensor) -> torch.Tensor:
    """Next-token scores [B, V] float32 of B sequences from their streams'
    logits [B, V] (``uncond`` None when no row is guided; an unguided row's
    is never read), each under its own guidance, with what its task may not
    write (``allowed`` [B, V] False) at -inf: one ``kernels.guidance`` call
    (one kernel launch on a GPU)."""
    guided, _ = guidance(cond, uncond, allowed, [p.guidance.value for p in params], [p.guidance_scale for p in params],
                         [p.contrastive_alpha for p in params], [p.contrastive_k for p in params])
    return guided


def scores(cond: torch.Tensor, uncond: torch.Tensor | None, params: Cm3Params, allowed: torch.Tensor) -> torch.Tensor:
    """One sequence's next-token scores [V] from its logits [V] (see ``batch_scores``)."""
    return batch_scores(cond[None], None if uncond is None else uncond[None], [params], allowed[None])[0]


def record(state: Cm3State, decoding: Decoding, symbol: int, tokenizer: TextTokenizer, image_tokens: int) -> bytes:
    """Records the chosen symbol; returns the output bytes now released. An
    image ends after its last code, text at ``<eos>`` or before a token that
    would take it past its byte budget (``max_new_bytes`` bounds the bytes)."""
    if symbol == EOS and state.task is not Task.IMAGE:
        decoding.end_of_sequence()
        return b""
    if state.task is Task.IMAGE:
        state.generated.append(symbol)
        if len(state.generated) == image_tokens:
            decoding.end_of_sequence()
        return b""
    piece = tokenizer.token_bytes(symbol) if symbol < tokenizer.vocab_size else b""
    if decoding.generated + len(piece) > decoding.params.max_new_bytes:
        decoding.out_of_budget()
        return b""
    state.generated.append(symbol)
    released = decoding.accept(piece)
    if len(state.generated) >= decoding.params.max_new_bytes:
        decoding.out_of_budget()  # image codes in an infill count as tokens, not bytes
    return released
