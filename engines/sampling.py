"""Choosing the next symbol from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import torch

from engines.api import SamplingParams


def make_generator(seed: int, device) -> torch.Generator:
    """A request's own generator: its samples never depend on other requests."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: [V] (disallowed symbols already at -inf) -> the chosen symbol id."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits.float()
    # Shift the best logit to 0 before dividing: any positive temperature,
    # however small or large, then gives finite probabilities.
    logits = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if 0.0 < params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
