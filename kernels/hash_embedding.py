"""BLT's hash n-gram embedding: the plain PyTorch reference and the Triton
kernel that must match it.

The local encoder's input at each position is the byte embedding plus one row
of every hash table (one table per hash function and n-gram size). The
kernel hashes each position's n-grams, gathers the rows and sums them in one
pass, so the [B, T, n_tables] ids and the [B, T, n_tables, dim] rows never
reach memory.

The hash ids are bit-exact with BLT's reference code. For each position t
and n-gram size n, the window is the n symbols ending at t (zero-padded on
the left). Its hash is sum_j window[j] * prime**j computed in int64 with
silent two's-complement wraparound (window[0] is the oldest symbol), then
reduced modulo the bucket count with a non-negative remainder.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from patchwork.kernels import dispatch
from patchwork.kernels.benchcase import BYTE_VOCAB, BenchCase, sets_beyond_cache
from patchwork.kernels.dispatch import launched

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None

# (atol, rtol) of the kernel against the reference, by the tables' dtype: the
# gather is exact; the float32 sum's order and the reference's rounding of the
# hash sum before it adds the byte row differ.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# One prime per hash function.
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


@lru_cache(maxsize=16)
def _coefficients(ngram_sizes: tuple[int, ...], n_functions: int, device: torch.device) -> torch.Tensor:
    """``last_position_coefficients``, built once per configuration and device."""
    return last_position_coefficients(list(ngram_sizes), n_functions, device)


def hash_embedding_reference(tokens: torch.Tensor, weight: torch.Tensor, ngram_sizes: list[int], n_functions: int,
                             buckets: int, byte_weight: torch.Tensor | None = None, history: int = 0) -> torch.Tensor:
    """tokens: int64 [B, history + T]; weight: the concatenated hash tables
    [n_tables * buckets, dim] -> [B, T, dim], the sum of every table's row at
    each of the last T positions, plus ``byte_weight[token]`` when given (the
    local encoder's input). The first ``history`` symbols only feed the
    n-grams of the others."""
    ids = hash_table_ids(tokens, ngram_sizes, n_functions, buckets)
    hashed = F.embedding(ids[:, history:], weight).sum(dim=2)
    if byte_weight is None:
        return hashed
    return F.embedding(tokens[:, history:], byte_weight) + hashed


def last_hash_embedding_reference(recent: torch.Tensor, weight: torch.Tensor, ngram_sizes: list[int],
                                  n_functions: int, buckets: int,
                                  byte_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The decode step: recent: int64 [B, max(ngram_sizes)], the last symbols
    of each sequence (left-padded with 0) -> [B, 1, dim], the last position of
    ``hash_embedding_reference``."""
    ids = last_hash_table_ids(recent, _coefficients(tuple(ngram_sizes), n_functions, recent.device), buckets)
    hashed = F.embedding(ids, weight).sum(dim=1)[:, None]
    if byte_weight is None:
        return hashed
    return F.embedding(recent[:, -1:], byte_weight) + hashed


if triton is not None:

    @triton.jit
    def _hash_embedding_kernel(tokens_ptr, coefficients_ptr, weight_ptr, byte_ptr, out_ptr,
                               n_rows, n_out, history, token_row_stride, token_stride,
                               weight_row_stride, weight_col_stride, byte_row_stride, byte_col_stride,
                               dim, buckets, N_TABLES: tl.constexpr, CONTEXT: tl.constexpr,
                               HAS_BYTES: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_D: tl.constexpr):
        # Flattened (sequence, output position), in int64: offsets of large outputs pass 2**31.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_rows, in_cols = rows < n_rows, cols < dim
        sequence = rows // n_out
        position = rows % n_out + history
        k = tl.arange(0, BLOCK_C)
        source = position[:, None] - (CONTEXT - 1) + k[None, :]  # the CONTEXT symbols ending at position
        in_window = in_rows[:, None] & (k[None, :] < CONTEXT) & (source >= 0)  # before the start: 0
        window = tl.load(tokens_ptr + sequence[:, None] * token_row_stride + source * token_stride,
                         mask=in_window, other=0)  # int64 [BLOCK_R, BLOCK_C]
        in_tile = in_rows[:, None] & in_cols[None, :]
        total = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for table in tl.static_range(N_TABLES):
            # The coefficient row is zero before the table's n-gram; int64 products and sums wrap.
            powers = tl.load(coefficients_ptr + table * CONTEXT + k, mask=k < CONTEXT, other=0)
            remainder = tl.sum(window * powers[None, :], axis=1) % buckets  # the sign of the hash (srem)
            ids = tl.where(remainder < 0, remainder + buckets, remainder) + tl.full((), table, tl.int64) * buckets
            total += tl.load(weight_ptr + ids[:, None] * weight_row_stride + cols[None, :] * weight_col_stride,
                             mask=in_tile, other=0.0).to(tl.float32)
        if HAS_BYTES:
            symbol = tl.load(tokens_ptr + sequence * token_row_stride + position * token_stride, mask=in_rows,
                             other=0)
            total += tl.load(byte_ptr + symbol[:, None] * byte_row_stride + cols[None, :] * byte_col_stride,
                             mask=in_tile, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * dim + cols[None, :], total.to(out_ptr.dtype.element_ty), mask=in_tile)


def hash_embedding_triton(tokens: torch.Tensor, weight: torch.Tensor, ngram_sizes: list[int], n_functions: int,
                          buckets: int, byte_weight: torch.Tensor | None = None, history: int = 0) -> torch.Tensor:
    """``hash_embedding_reference`` in one forward-only kernel: each program
    hashes a block of positions (flattened over the batch) for every table,
    gathers the rows of a block of columns and sums them in float32 (the byte
    row last), written in the tables' dtype. Strided tokens and tables are
    read in place."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    coefficients = _coefficients(tuple(ngram_sizes), n_functions, tokens.device)  # int64 [n_tables, context]
    n_tables, context = coefficients.shape
    batch, length = tokens.shape
    dim = weight.shape[1]
    dtype = weight.dtype if byte_weight is None else torch.promote_types(weight.dtype, byte_weight.dtype)
    out = torch.empty(batch, length - history, dim, dtype=dtype, device=weight.device)
    rows = byte_weight if byte_weight is not None else weight  # an unread pointer without byte rows
    block_r, block_d = 16, min(triton.next_power_of_2(dim), 256)
    launched("hash_embedding")
    _hash_embedding_kernel[(triton.cdiv(batch * (length - history), block_r), triton.cdiv(dim, block_d))](
        tokens, coefficients, weight, rows, out, batch * (length - history), length - history, history,
        tokens.stride(0), tokens.stride(1), weight.stride(0), weight.stride(1), rows.stride(0), rows.stride(1),
        dim, buckets, N_TABLES=n_tables, CONTEXT=context, HAS_BYTES=byte_weight is not None,
        BLOCK_C=triton.next_power_of_2(context), BLOCK_R=block_r, BLOCK_D=block_d,
    )
    return out


def _tables(byte_weight: torch.Tensor | None) -> list[torch.Tensor]:
    return [] if byte_weight is None else [byte_weight]


def hash_embedding(tokens: torch.Tensor, weight: torch.Tensor, ngram_sizes: list[int], n_functions: int,
                   buckets: int, byte_weight: torch.Tensor | None = None, history: int = 0) -> torch.Tensor:
    """``hash_embedding_reference`` or the kernel, as ``dispatch`` decides for
    the hash tables: the gather runs where they live (tokens are small int64
    that follow them), and a call that records gradients for them stays with
    the reference in ``auto``."""
    if dispatch.use_triton(weight, *_tables(byte_weight)):
        return hash_embedding_triton(tokens, weight, ngram_sizes, n_functions, buckets, byte_weight, history)
    return hash_embedding_reference(tokens, weight, ngram_sizes, n_functions, buckets, byte_weight, history)


def last_hash_embedding(recent: torch.Tensor, weight: torch.Tensor, ngram_sizes: list[int], n_functions: int,
                        buckets: int, byte_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The decode step (``last_hash_embedding_reference``); the kernel runs it
    as the sequence path's last position."""
    if dispatch.use_triton(weight, *_tables(byte_weight)):
        return hash_embedding_triton(recent, weight, ngram_sizes, n_functions, buckets, byte_weight,
                                     history=recent.shape[1] - 1)
    return last_hash_embedding_reference(recent, weight, ngram_sizes, n_functions, buckets, byte_weight)


def bench_case(scale: int, device, dtype: torch.dtype) -> BenchCase:
    """The local encoder's input for ``scale`` windows of 256 bytes (the
    default preset's) at BLT's hashing (n-grams 3 to 8, one function) and a
    local dim of 512; the tables grow with the scale up to the published
    500,002 buckets (at scale 64, the GPU default: 3M rows, gathered at random)."""
    ngram_sizes, n_functions, buckets, dim = [3, 4, 5, 6, 7, 8], 1, min(8191 * scale, 500_002), 512
    batch, length = scale, 256
    n_tables, positions = n_functions * len(ngram_sizes), batch * length
    # Tokens read, one row of every table and of the byte table gathered, the output written.
    bytes_moved = positions * 8 + positions * (n_tables + 1) * dim * dtype.itemsize + positions * dim * dtype.itemsize
    generator = torch.Generator(device=device).manual_seed(scale)
    weight = torch.randn(n_tables * buckets, dim, generator=generator, device=device, dtype=dtype).mul_(dim**-0.5)
    byte_weight = torch.randn(BYTE_VOCAB, dim, generator=generator, device=device, dtype=dtype).mul_(dim**-0.5)
    # The tables are shared: each set's tokens gather other rows.
    inputs = [(torch.randint(0, BYTE_VOCAB, (batch, length), generator=generator, device=device), weight,
               ngram_sizes, n_functions, buckets, byte_weight) for _ in range(sets_beyond_cache(bytes_moved, device))]
    return BenchCase(
        name=f"hash_embedding[{batch}x{length}, {n_tables}x{buckets} rows, dim {dim}]",
        inputs=inputs, triton=hash_embedding_triton, baseline=hash_embedding_reference,
        bytes_moved=bytes_moved, tolerance=TOLERANCE[dtype],
    )
