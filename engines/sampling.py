"""Choosing the next symbol from logits: greedy, temperature, top-k, top-p.

Every row of a step is chosen in tensor operations over the whole batch
(``sample_rows``); the one thing done per row is its random draw, from the
request's own generator, so a request's samples never depend on the others
in its batch. A draw picks as ``torch.multinomial(probs, 1)`` does (an
exponential variate per symbol, then the argmax of ``probs / variate``), so a
row chosen in a batch gets the symbol it gets alone (``sample_next``)."""

from __future__ import annotations

import torch

from patchwork.engines.api import SamplingParams

# Why a row cannot be sampled (torch.multinomial's words for it).
INVALID = "probability tensor contains either `inf`, `nan` or element < 0, or sums to 0"


def make_generator(seed: int, device) -> torch.Generator:
    """A request's own generator: its samples never depend on other requests."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits: [V] (disallowed symbols already at -inf) -> the chosen symbol id."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    symbols, invalid = sample_rows(logits[None], [params], [generator])
    if bool(invalid[0]):
        raise RuntimeError(INVALID)
    return int(symbols[0])


def choose_rows(logits: torch.Tensor, decodings: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The next symbol of every row of ``logits`` [B, V], each row under its
    own ``Decoding``'s parameters and generator, on the device (nothing is
    read to the host): one argmax for the greedy rows, one ``sample_rows``
    for the others. Each row's symbol is the one ``sample_next`` gives for it
    alone. Returns (symbols [B], failed [B] bool): a row that cannot be
    sampled (``INVALID``) is failed, with symbol 0 in its place, and the
    others are chosen as if it were not there."""
    sampled = [i for i, decoding in enumerate(decodings) if decoding.params.temperature != 0.0]
    if not sampled:
        return torch.argmax(logits, dim=-1), torch.zeros(len(decodings), dtype=torch.bool, device=logits.device)
    symbols, invalid = sample_rows(logits if len(sampled) == len(decodings) else logits[sampled],
                                   [decodings[i].params for i in sampled], [decodings[i].generator for i in sampled])
    symbols = torch.where(invalid, 0, symbols)
    if len(sampled) == len(decodings):
        return symbols, invalid
    rows = torch.tensor(sampled, device=logits.device)
    chosen = torch.argmax(logits, dim=-1).index_copy(0, rows, symbols)
    failed = torch.zeros(len(decodings), dtype=torch.bool, device=logits.device).index_copy(0, rows, invalid)
    return chosen, failed


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [S, V] of rows that sample (temperature above 0) -> (symbols
    [S], invalid [S] bool: rows whose probabilities cannot be drawn from, a
    NaN logit say; their symbol means nothing). Nothing is read to the host."""
    probs = sampling_probs(logits, params)  # [S, V]
    vocab = probs.shape[-1]
    # Each row's exponential variates from its own generator, as torch.multinomial draws them.
    variates = torch.stack([torch.empty(vocab, dtype=probs.dtype, device=probs.device).exponential_(1, generator=g)
                            for g in generators])
    symbols = torch.argmax(probs / variates, dim=-1)
    # Softmax gives no negative probability, so a row is drawable when its
    # total is finite and positive (a NaN or infinite logit makes it NaN).
    total = probs.sum(dim=-1)
    return symbols, ~((total > 0) & (total < float("inf")))


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [S, V] -> the probabilities [S, V] float32 each row draws from:
    its temperature, then its top-k and top-p cuts (rows without one are left whole)."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)[:, None]
    logits = logits.float()
    # Shift the best logit to 0 before dividing: any positive temperature,
    # however small or large, then gives finite probabilities.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    vocab = logits.shape[-1]
    if any(0 < p.top_k < vocab for p in params):
        # The k-th largest scaled logit of each row with a top-k; a row without one takes its
        # smallest (k = V), below which nothing lies, so nothing is cut.
        k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
        kth = torch.sort(logits, dim=-1, descending=True, stable=True).values.gather(-1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if any(0.0 < p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p if 0.0 < p.top_p < 1.0 else float("inf") for p in params],
                             dtype=torch.float32, device=device)[:, None]
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return probs
