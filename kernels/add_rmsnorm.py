"""RMSNorm with a fused residual add, forward and backward: the PyTorch
reference and the Triton kernels that must match it.

A pre-norm block adds each sublayer's output to the residual stream and
normalises the sum for the next sublayer; fused, one pass reads both
addends and writes the sum (the new stream) and its norm.
"""

from __future__ import annotations

import math

import torch

from patchwork.kernels import dispatch
from patchwork.kernels.benchcase import BenchCase, sets_beyond_cache
from patchwork.kernels.dispatch import launched
from patchwork.kernels.rmsnorm import rms_norm_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, summed): summed = x + residual, normed = its RMSNorm
    (``rms_norm_reference``): the same ops, in the same order, as unfused."""
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed


if triton is not None:

    @triton.jit
    def _add_rms_norm_forward_kernel(x_ptr, r_ptr, w_ptr, sum_ptr, y_ptr, inv_rms_ptr,
                                     x_row_stride, r_row_stride, w_stride, sum_row_stride, y_row_stride,
                                     n_cols, eps, BLOCK: tl.constexpr):
        # x, residual, summed, normed: [rows, n_cols]; inv_rms: [rows] float32
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        in_row = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * r_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
        summed = (x + r).to(sum_ptr.dtype.element_ty)  # rounded as the unfused add rounds it
        tl.store(sum_ptr + row * sum_row_stride + cols, summed, mask=in_row)
        s = summed.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n_cols + eps)
        tl.store(inv_rms_ptr + row, inv_rms)
        normed = (s * inv_rms).to(sum_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols * w_stride, mask=in_row, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * y_row_stride + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def _add_rms_norm_backward_kernel(dy_ptr, dsum_ptr, sum_ptr, w_ptr, inv_rms_ptr, dx_ptr, dw_ptr,
                                      dy_row_stride, dsum_row_stride, sum_row_stride, w_stride, dx_row_stride,
                                      n_rows, n_cols, rows_per_program, BLOCK: tl.constexpr):
        # Rows [program * rows_per_program, ...): d_x per row, and this
        # program's partial d_weight (row ``program`` of dw [programs, n_cols]).
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        in_row = cols < n_cols
        w = tl.load(w_ptr + cols * w_stride, mask=in_row, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        first = program.to(tl.int64) * rows_per_program
        for row in range(first, tl.minimum(first + rows_per_program, n_rows)):
            s = tl.load(sum_ptr + row * sum_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
            inv_rms = tl.load(inv_rms_ptr + row)
            dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
            normed = s * inv_rms
            dw += dy * normed.to(sum_ptr.dtype.element_ty).to(tl.float32)
            dn = dy * w
            # d/ds of s * inv_rms(s), then the gradient that reaches the sum directly
            ds = inv_rms * (dn - normed * (tl.sum(dn * normed, axis=0) / n_cols))
            ds += tl.load(dsum_ptr + row * dsum_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * dx_row_stride + cols, ds.to(dx_ptr.dtype.element_ty), mask=in_row)
        tl.store(dw_ptr + program * n_cols + cols, dw, mask=in_row)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t: [..., n] -> [rows, n], a view whenever the leading dimensions allow
    one; copied only when the last dimension is strided."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _num_warps(block: int) -> int:
    return 4 if block < 2048 else 8 if block < 8192 else 16


def _backward_programs(device: torch.device, n_rows: int) -> int:
    """Programs of the backward: a few per SM on a GPU (each sums its rows'
    d_weight), few under the interpreter (which runs them one by one)."""
    if device.type == "cuda":
        return min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)


class _AddRmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        n_cols = x.shape[-1]
        x_rows, r_rows = _rows(x), _rows(residual)
        summed = torch.empty(x_rows.shape, dtype=x.dtype, device=x.device)
        normed = torch.empty(x_rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        inv_rms = torch.empty(x_rows.shape[0], dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n_cols)
        launched("add_rms_norm")
        _add_rms_norm_forward_kernel[(x_rows.shape[0],)](
            x_rows, r_rows, weight, summed, normed, inv_rms,
            x_rows.stride(0), r_rows.stride(0), weight.stride(0), summed.stride(0), normed.stride(0),
            n_cols, eps, BLOCK=block, num_warps=_num_warps(block),
        )
        ctx.save_for_backward(summed, weight, inv_rms)
        return normed.view(x.shape), summed.view(x.shape)

    @staticmethod
    def backward(ctx, d_normed, d_summed):
        summed, weight, inv_rms = ctx.saved_tensors  # summed: [rows, n_cols]; inv_rms: [rows] float32
        n_rows, n_cols = summed.shape
        dy_rows, dsum_rows = _rows(d_normed), _rows(d_summed)
        d_x = torch.empty_like(summed)
        programs = _backward_programs(summed.device, n_rows)
        # d_weight: each program's float32 sum over its rows (in order, so the
        # error grows with rows / programs, as a plain sum's does), then torch
        # sums the programs' rows. No atomics: the result is deterministic.
        d_weight = torch.empty(programs, n_cols, dtype=torch.float32, device=summed.device)
        block = triton.next_power_of_2(n_cols)
        launched("add_rms_norm_backward")
        _add_rms_norm_backward_kernel[(programs,)](
            dy_rows, dsum_rows, summed, weight, inv_rms, d_x, d_weight,
            dy_rows.stride(0), dsum_rows.stride(0), summed.stride(0), weight.stride(0), d_x.stride(0),
            n_rows, n_cols, triton.cdiv(n_rows, programs), BLOCK=block, num_warps=_num_warps(block),
        )
        d_x = d_x.view(d_normed.shape)
        return d_x, d_x, d_weight.sum(0).to(weight.dtype), None


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, summed) as ``add_rms_norm_reference``, by Triton (one program
    per row), differentiable: autograd runs the Triton backward. x and
    residual: the same shape and dtype [..., n_cols]; their rows may be
    strided; weight [n_cols]."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(f"x {x.dtype} {tuple(x.shape)} and residual {residual.dtype} {tuple(residual.shape)} "
                         "must have the same shape and dtype")
    return _AddRmsNorm.apply(x, residual, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual): Triton or the reference, as
    ``kernels.dispatch`` decides (the kernel has a backward, so training on
    a GPU runs it too). Inputs of different dtypes (the reference promotes
    them) take the reference."""
    if x.dtype == residual.dtype and dispatch.use_triton(x, residual, weight, differentiable=True):
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
# Forward and backward, (atol per sqrt(row), rtol): d_weight sums a product
# over every row, each rounded to the low precision by the baseline, so its
# error grows as sqrt(rows). At 4096 x 4096 (scale 64) the interpreter
# (which rounds to bfloat16 by truncation) needed about half this atol.
BACKWARD_TOLERANCE = {torch.float32: (2e-6, 1e-4), torch.float16: (1e-3, 1e-2), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(rows: int, width: int, device, dtype, seed: int, backward: bool) -> tuple:
    """x, residual, weight, eps; with ``backward`` x, residual and weight
    require gradients, and the gradients of normed and summed follow."""
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    x, residual, weight = normal(rows, width), normal(rows, width), 1 + normal(width) / 4
    if not backward:
        return x, residual, weight, 1e-5
    leaves = tuple(t.requires_grad_() for t in (x, residual, weight))
    return *leaves, 1e-5, normal(rows, width), normal(rows, width)


def _with_gradients(function):
    """``function``'s outputs, then the gradients of x, residual and weight."""
    def run(x, residual, weight, eps, d_normed, d_summed):
        outputs = function(x, residual, weight, eps)
        return *outputs, *torch.autograd.grad(outputs, (x, residual, weight), (d_normed, d_summed))
    return run


def bench_case(scale: int, device, dtype: torch.dtype, backward: bool = False) -> BenchCase:
    """``64 * scale`` rows of width 4096 per input set: the forward alone, or
    (``backward``) forward and backward for given gradients of both outputs."""
    rows, width = 64 * scale, 4096
    sets = sets_beyond_cache(2 * rows * width * dtype.itemsize, device)
    inputs = [_inputs(rows, width, device, dtype, seed, backward) for seed in range(sets)]
    forward_bytes = (3 * rows * width + width) * dtype.itemsize  # x, residual, weight in; normed, summed out
    if not backward:
        return BenchCase(name=f"add_rms_norm[{rows}x{width}]", inputs=inputs, triton=add_rms_norm_triton,
                         baseline=add_rms_norm_reference, bytes_moved=forward_bytes, tolerance=TOLERANCE[dtype])
    backward_bytes = (3 * rows * width + width) * dtype.itemsize  # d_normed, d_summed in; d_x, d_weight out
    atol_per_sqrt_row, rtol = BACKWARD_TOLERANCE[dtype]
    return BenchCase(name=f"add_rms_norm_backward[{rows}x{width}]", inputs=inputs, triton=_with_gradients(add_rms_norm_triton),
                     baseline=_with_gradients(add_rms_norm_reference), bytes_moved=forward_bytes + backward_bytes,
                     tolerance=(atol_per_sqrt_row * math.sqrt(rows), rtol))
