"""Grouped linear (Mixture-of-Transformers): rows sorted by group, each group
through its own weight. The plain PyTorch reference (one matmul per group)
and the Triton kernel that must match it (one launch for every group)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F

from patchwork.kernels import dispatch
from patchwork.kernels.benchcase import BenchCase, sets_beyond_cache
from patchwork.kernels.dispatch import launched

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None

Weights = torch.Tensor | Sequence[torch.Tensor]


def grouped_linear_reference(x: torch.Tensor, weight: Weights, offsets: torch.Tensor) -> torch.Tensor:
    """x [N, K], rows sorted by group; weight [G, Nout, K] (or its G matrices
    [Nout, K], read in place); offsets int64 [G + 1]: group g owns rows
    offsets[g]:offsets[g + 1] (possibly none) -> [N, Nout], each row times
    its group's weight transposed: one ``F.linear`` per non-empty group."""
    bounds = offsets.tolist()
    parts = [F.linear(x[start:end], w) for w, start, end in zip(weight, bounds, bounds[1:]) if end > start]
    if not parts:
        return x.new_empty(0, weight[0].shape[0])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


if triton is not None:

    @triton.jit
    def _grouped_linear_kernel(x_ptr, w_ptr, y_ptr, offsets_ptr, n_out, n_in, row_tiles,
                               x_row_stride, x_col_stride, w_group_stride, w_row_stride, w_col_stride,
                               y_row_stride, y_col_stride,
                               GROUPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
                               PRECISION: tl.constexpr):
        # Program -> (row tile, column tile), GROUP_M row tiles at a time down
        # each column tile, so that programs running together share weight tiles.
        pid = tl.program_id(0)
        col_tiles = tl.cdiv(n_out, BLOCK_N)
        band = pid // (GROUP_M * col_tiles)
        first = band * GROUP_M
        band_rows = tl.minimum(row_tiles - first, GROUP_M)
        tile_m = first + (pid % (GROUP_M * col_tiles)) % band_rows
        tile_n = (pid % (GROUP_M * col_tiles)) // band_rows

        # Row tile -> (group, first row, group end): each group's rows are cut
        # into tiles of their own, after the tiles of the groups before it. The
        # grid's spare tiles (up to one per group) match no group: all masked.
        group = 0
        start = 0
        end = 0
        seen = 0
        for g in tl.static_range(GROUPS):
            lo = tl.load(offsets_ptr + g).to(tl.int32)
            hi = tl.load(offsets_ptr + g + 1).to(tl.int32)
            tiles = tl.cdiv(hi - lo, BLOCK_M)
            here = (tile_m >= seen) & (tile_m < seen + tiles)
            group = tl.where(here, g, group)
            start = tl.where(here, lo + (tile_m - seen) * BLOCK_M, start)
            end = tl.where(here, hi, end)
            seen += tiles

        rows = start + tl.arange(0, BLOCK_M)
        cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        in_rows, in_cols = rows < end, cols < n_out
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride  # [BLOCK_M, 1]
        w_cols = w_ptr + group.to(tl.int64) * w_group_stride + cols.to(tl.int64)[None, :] * w_row_stride  # [1, BLOCK_N]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            in_k = ks < n_in
            a = tl.load(x_rows + ks[None, :] * x_col_stride, mask=in_rows[:, None] & in_k[None, :], other=0.0)
            b = tl.load(w_cols + ks[:, None] * w_col_stride, mask=in_k[:, None] & in_cols[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)  # [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N]
        y = y_ptr + rows.to(tl.int64)[:, None] * y_row_stride + cols[None, :] * y_col_stride
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=in_rows[:, None] & in_cols[None, :])


def _config(x: torch.Tensor) -> dict:
    """Tile sizes and launch settings: small tiles in the interpreter (CPU
    tensors), else Hopper-sized ones (one warp group per 64 rows, 4 stages
    of loads in flight); 64-row tiles when there are few rows (decoding)."""
    if not x.is_cuda:
        return {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
    block_m = 64 if x.shape[0] <= 1024 else 128
    return {"BLOCK_M": block_m, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": block_m // 16,
            "num_stages": 4}


def grouped_linear_triton(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Forward-only Triton grouped linear, one launch for every group: see
    ``grouped_linear_reference``. Float32 accumulation; 16-bit inputs
    multiply as they are on a GPU and are cast to float32 first in the
    interpreter; float32 inputs multiply in full float32 unless torch allows
    TF32 for its own matmuls. ``offsets`` may live on the host."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight {weight.dtype}")
    (n_rows, n_in), (groups, n_out, _) = x.shape, weight.shape
    config = _config(x)
    row_tiles = triton.cdiv(n_rows, config["BLOCK_M"]) + groups  # at most one partial tile per group
    out = torch.empty(n_rows, n_out, dtype=x.dtype, device=x.device)
    tf32 = x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32
    launched("grouped_linear")
    _grouped_linear_kernel[(row_tiles * triton.cdiv(n_out, config["BLOCK_N"]),)](
        x, weight, out, offsets.to(x.device, non_blocking=True), n_out, n_in, row_tiles,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), weight.stride(2), out.stride(0), out.stride(1),
        GROUPS=groups, UPCAST=not x.is_cuda, PRECISION="tf32" if tf32 else "ieee", **config,
    )
    return out


def grouped_linear(x: torch.Tensor, weight: Weights, offsets: torch.Tensor) -> torch.Tensor:
    """The grouped linear as ``kernels.dispatch`` decides. ``weight`` is the
    stacked [G, Nout, K] or its G matrices: the reference reads those in
    place, the kernel stacks them first (stack once, ahead, for speed)."""
    weights = [weight] if isinstance(weight, torch.Tensor) else list(weight)
    if dispatch.use_triton(x, *weights):
        stacked = weight if isinstance(weight, torch.Tensor) else torch.stack(weights)
        return grouped_linear_triton(x, stacked, offsets)
    return grouped_linear_reference(x, weight, offsets)


# (atol, rtol) against the reference: outputs of about unit size, K up to 4096, a rounding of the output apart.
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}
# Each input set's eighths of the rows per group: uneven, one group empty in two of three.
SPLITS = ((5, 3, 0), (4, 1, 3), (0, 6, 2))


def _size(scale: int) -> tuple[int, int]:
    """rows x dim (K = Nout): 128 x 64 at scale 1 (the interpreter), 8192 x 4096 at scale 64."""
    return 128 * scale, 64 * scale


def bench_case(scale: int, device, dtype) -> BenchCase:
    """Three modalities' [dim, dim] projections of ``rows`` tokens split
    unevenly between them, against the loop of matmuls; ``dense`` is one
    matmul of the same total size (every row through the first weight)."""
    rows, dim = _size(scale)
    element = torch.empty((), dtype=dtype).element_size()
    bytes_moved = (rows * dim + len(SPLITS[0]) * dim * dim + rows * dim) * element  # x, weights in; y out
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = []
    for i in range(sets_beyond_cache(bytes_moved, device)):
        split = SPLITS[i % len(SPLITS)]
        offsets = torch.tensor([0, *accumulate(rows * share // 8 for share in split)])  # on the host, as in MoT
        x = torch.randn(rows, dim, generator=generator, device=device).to(dtype)
        weight = (torch.randn(len(split), dim, dim, generator=generator, device=device) / dim**0.5).to(dtype)
        inputs.append((x, weight, offsets))
    return BenchCase(name=f"grouped_linear[{rows}x{dim} by 3x{dim}x{dim}]", inputs=inputs, triton=grouped_linear_triton,
                     baseline=grouped_linear_reference, bytes_moved=bytes_moved, tolerance=TOLERANCE[dtype],
                     flops=2 * rows * dim * dim, dense=lambda x, weight, offsets: F.linear(x, weight[0]))
