"""RMSNorm: the plain PyTorch reference and the Triton kernel that must match it."""

from __future__ import annotations

import torch

from patchwork.kernels import dispatch
from patchwork.kernels.benchcase import BenchCase, sets_beyond_cache
from patchwork.kernels.dispatch import launched

# (atol, rtol) of the kernel against the reference, by input dtype.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps): statistics in float32, the
    normalised x cast back to x's dtype before the weight (as in Llama)."""
    if x.dtype == weight.dtype == torch.float32:  # the same numbers in one call (no casts)
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    normed = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton kernel or the reference, as ``kernels.dispatch`` decides."""
    if dispatch.use_triton(x, weight):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, x_row_stride, w_stride, y_row_stride, n_cols, eps,
                         BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        in_row = cols < n_cols
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        normed = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols * w_stride, mask=in_row, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * y_row_stride + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=in_row)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Forward-only Triton RMSNorm over the last dimension (one program per
    row). Rows may be strided (a slice of a wider tensor is read in place);
    only a last dimension that is itself strided is copied first."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    n_cols = x.shape[-1]
    rows = x.reshape(-1, n_cols)  # a view whenever the leading dimensions allow one
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    launched("rms_norm")
    _rms_norm_kernel[(rows.shape[0],)](
        rows, weight, out, rows.stride(0), weight.stride(0), out.stride(0), n_cols, eps,
        BLOCK=triton.next_power_of_2(n_cols),
    )
    return out.view(*x.shape[:-1], n_cols)


def bench_case(scale: int, device, dtype: torch.dtype) -> BenchCase:
    """``64 * scale`` rows of width 4096 (a large model's hidden size) per input set."""
    rows, width = 64 * scale, 4096
    sets = sets_beyond_cache(rows * width * dtype.itemsize, device)
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = [(torch.randn(rows, width, device=device, generator=generator).to(dtype),
               torch.randn(width, device=device, generator=generator).to(dtype), 1e-5) for _ in range(sets)]
    return BenchCase(
        name=f"rms_norm[{rows}x{width}]", inputs=inputs, triton=rms_norm_triton, baseline=rms_norm_reference,
        bytes_moved=2 * rows * width * dtype.itemsize + width * dtype.itemsize,
        tolerance=TOLERANCE[dtype],
    )
