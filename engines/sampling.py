"""Choosing the next symbol from logits: greedy, temperature, top-k, top-p."""

from __future__ import annotations

import torch

from patchwork.engines.api import SamplingParams


def make_generator(seed: int, device) -> torch.Generator:
    """A request's own generator: its samples never depend on other requests."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: [V] (disallowed symbols already at -inf) -> the chosen symbol id."""
    return int(sample_on_device(logits, params, generator))


def choose_rows(logits: torch.Tensor, decodings: list) -> tuple[torch.Tensor, dict[int, Exception]]:
    """The next symbol of every row of ``logits`` [B, V], each row under its
    own ``Decoding``'s parameters and generator, on the device (nothing is
    read to the host): the greedy rows take one argmax together, the sampling
    rows their own draws. Each row's symbol is the one ``sample_next`` gives
    for it alone. A row that cannot be sampled gets its error in the returned
    map (and symbol 0 in its place), and the others are chosen as if it were
    not there."""
    greedy = [i for i, decoding in enumerate(decodings) if decoding.params.temperature == 0.0]
    if len(greedy) == len(decodings):
        return torch.argmax(logits, dim=-1), {}
    chosen = torch.zeros(len(decodings), dtype=torch.long, device=logits.device)
    if greedy:
        rows = torch.tensor(greedy, device=logits.device)
        chosen[rows] = torch.argmax(logits[rows], dim=-1)
    errors: dict[int, Exception] = {}
    for i, decoding in enumerate(decodings):
        if decoding.params.temperature != 0.0:
            try:
                chosen[i] = sample_on_device(logits[i], decoding.params, decoding.generator)
            except Exception as error:  # this row's own failure (e.g. NaN logits)
                errors[i] = error
    return chosen, errors


def sample_on_device(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """``sample_next`` without reading the result to the host: a 0-dim tensor."""
    if params.temperature == 0.0:
        return torch.argmax(logits)
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
    return torch.multinomial(probs, 1, generator=generator)[0]
