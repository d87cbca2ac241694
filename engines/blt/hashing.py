"""Hash n-gram ids of the BLT local encoder, bit-exact with the reference code.

For each position t and n-gram size n, the window is the n symbols ending at
t (zero-padded on the left). Its hash is sum_j window[j] * prime**j computed in
int64 with silent two's-complement wraparound (window[0] is the oldest
symbol), then reduced modulo the bucket count with a non-negative remainder.
"""

from __future__ import annotations

import torch

PRIMES = (
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
)


def rolling_hash(windows: torch.Tensor, prime: int) -> torch.Tensor:
    """windows: int64 [..., n] -> int64 [...], wrapping like the reference."""
    powers = torch.tensor(prime, dtype=torch.int64, device=windows.device) ** torch.arange(
        windows.shape[-1], device=windows.device
    )
    return (windows * powers).sum(dim=-1)


def ngram_hash_ids(tokens: torch.Tensor, n: int, prime: int, buckets: int) -> torch.Tensor:
    """tokens: int64 [B, T] -> bucket ids [B, T] of the n-gram ending at each position."""
    padded = torch.cat([tokens.new_zeros(tokens.shape[0], n - 1), tokens], dim=1)
    return torch.remainder(rolling_hash(padded.unfold(1, n, 1), prime), buckets)


def hash_table_ids(tokens: torch.Tensor, ngram_sizes: list[int], n_functions: int, buckets: int) -> torch.Tensor:
    """Ids into the concatenated hash tables, one table per (function, n): [B, T, n_tables]."""
    ids = []
    for function in range(n_functions):
        for n in ngram_sizes:
            table = len(ids)
            ids.append(ngram_hash_ids(tokens, n, PRIMES[function], buckets) + table * buckets)
    return torch.stack(ids, dim=-1)


def last_position_coefficients(ngram_sizes: list[int], n_functions: int, device) -> torch.Tensor:
    """int64 [n_tables, max(ngram_sizes)]: row t holds table t's prime powers
    aligned to the end of the window, zero before its n-gram."""
    context = max(ngram_sizes)
    coefficients = torch.zeros(n_functions * len(ngram_sizes), context, dtype=torch.int64)
    for function in range(n_functions):
        prime = torch.tensor(PRIMES[function], dtype=torch.int64)
        for i, n in enumerate(ngram_sizes):
            coefficients[function * len(ngram_sizes) + i, context - n :] = prime ** torch.arange(n)
    return coefficients.to(device)


def last_hash_table_ids(recent: torch.Tensor, coefficients: torch.Tensor, buckets: int) -> torch.Tensor:
    """The ids of ``hash_table_ids`` for the last position only, from the last
    ``max(ngram_sizes)`` symbols [B, C] (left-padded with 0): [B, n_tables].

    Every table's hash is its coefficient row (``last_position_coefficients``)
    dotted with the window; wrapping int64 arithmetic gives the same value in
    any summation order.
    """
    offsets = torch.arange(coefficients.shape[0], device=recent.device) * buckets
    return torch.remainder((recent[:, None, :] * coefficients).sum(dim=-1), buckets) + offsets
