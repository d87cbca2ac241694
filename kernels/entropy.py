"""BLT's patch-boundary test: the entropy of each next-symbol distribution and
whether it crosses the patching threshold, as the plain PyTorch reference and
the Triton kernel that must match it.

The entropy model gives logits [..., V] for the symbol after each position;
entropy patching starts a patch where H > threshold, monotonic patching where
H - H_before > threshold (H_before: the entropy one position earlier). The
kernel reads each row of logits once and writes only the entropy and the
decision, so the softmax [..., V] never reaches memory.
"""

from __future__ import annotations

import math

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

# (atol, rtol) of the kernel's entropies against the reference's, by logits
# dtype: the same for all, as both read the same values and compute in float32
# (the reference's own float32 error, up to 4e-6 relative at 50,257 symbols, dominates).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-5)}
# The most vocabulary one loop iteration of the kernel reads.
MAX_BLOCK = 4096


def entropies_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each next-symbol distribution: [..., V] -> [...].
    Masked symbols (-inf logits) add 0 (p log p -> 0); a NaN logit gives NaN."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs.clamp(min=torch.finfo(torch.float32).min)).sum(dim=-1)


def entropy_boundary_reference(logits: torch.Tensor, threshold: float,
                               entropy_before: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [..., V] -> (entropy float32 [...] in nats, exceeds bool [...]):
    exceeds is entropy > threshold, or with ``entropy_before`` (float32,
    broadcast to [...]) entropy - entropy_before > threshold. A NaN entropy
    never exceeds."""
    entropy = entropies_from_logits(logits)
    rise = entropy if entropy_before is None else entropy - entropy_before
    return entropy, rise > threshold


if triton is not None:

    @triton.jit
    def _entropy_boundary_kernel(logits_ptr, before_ptr, entropy_ptr, exceeds_ptr, row_stride, before_stride,
                                 n_cols, threshold, MONOTONIC: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        start = logits_ptr + row.to(tl.int64) * row_stride
        cols = tl.arange(0, BLOCK)
        # Over the symbols read so far: the largest logit m, s = sum exp(x - m), t = sum exp(x - m) (x - m).
        m = tl.full((), float("-inf"), tl.float32)
        s = tl.full((), 0.0, tl.float32)
        t = tl.full((), 0.0, tl.float32)
        for first in range(0, n_cols, BLOCK):
            x = tl.load(start + first + cols, mask=first + cols < n_cols, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, axis=0))
            # Rescaled to new_m, each old term's exp gains a factor exp(shift) and its (x - m) adds
            # shift; while every logit read is -inf there is nothing to rescale (s = t = 0).
            shift = tl.where(m == float("-inf"), 0.0, m - new_m)
            factor = tl.exp(shift)
            t = factor * (t + shift * s)
            s = factor * s
            masked = x == float("-inf")  # masked symbols (and the padding) add 0, not exp(-inf) * -inf
            z = tl.where(masked, 0.0, x - new_m)
            e = tl.where(masked, 0.0, tl.exp(z))  # a NaN logit makes s NaN, so the entropy too
            s += tl.sum(e, axis=0)
            t += tl.sum(e * z, axis=0)
            m = new_m
        entropy = tl.log(s) - t / s  # H = -sum p log p with p = exp(x - m) / s
        rise = entropy
        if MONOTONIC:
            rise = entropy - tl.load(before_ptr + row * before_stride).to(tl.float32)
        tl.store(entropy_ptr + row, entropy)
        tl.store(exceeds_ptr + row, (rise > threshold).to(tl.uint8))


def entropy_boundary_triton(logits: torch.Tensor, threshold: float,
                            entropy_before: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``entropy_boundary_reference`` in one forward-only kernel, one program
    per row: a loop over blocks of the vocabulary keeps a running max and the
    rescaled sums, in float32 whatever the logits' dtype. Rows may be strided
    (a slice of a wider tensor is read in place); only a last dimension that
    is itself strided is copied first."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    shape, n_cols = logits.shape[:-1], logits.shape[-1]
    rows = logits.reshape(-1, n_cols)  # a view whenever the leading dimensions allow one
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    entropy = torch.empty(shape, dtype=torch.float32, device=logits.device)
    exceeds = torch.empty(shape, dtype=torch.bool, device=logits.device)
    if entropy.numel() == 0:
        return entropy, exceeds
    # One entropy before per row, read in place where a view can give it (a broadcast one has stride 0).
    before = entropy.view(-1) if entropy_before is None else torch.broadcast_to(entropy_before, shape).reshape(-1)
    launched("entropy_boundary")
    _entropy_boundary_kernel[(rows.shape[0],)](
        rows, before, entropy, exceeds.view(torch.uint8), rows.stride(0), before.stride(0), n_cols, threshold,
        MONOTONIC=entropy_before is not None, BLOCK=min(triton.next_power_of_2(n_cols), MAX_BLOCK),
    )
    return entropy, exceeds


def entropy_boundary(logits: torch.Tensor, threshold: float,
                     entropy_before: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``entropy_boundary_reference`` or the kernel, as ``dispatch`` decides for the logits."""
    if dispatch.use_triton(logits):
        return entropy_boundary_triton(logits, threshold, entropy_before)
    return entropy_boundary_reference(logits, threshold, entropy_before)


def bench_case(scale: int, device, dtype: torch.dtype, vocab: int = BYTE_VOCAB) -> BenchCase:
    """Entropy patching of ``64 * scale`` rows of logits over ``vocab``
    symbols (BLT's 260; 50,257 for a GPT-2-sized entropy model) per input set.
    Rows alternate between nearly flat and peaked distributions with the
    threshold between them, so no decision is a tie that rounding could flip."""
    rows = 64 * scale
    sets = sets_beyond_cache(rows * vocab * dtype.itemsize, device)
    generator = torch.Generator(device=device).manual_seed(vocab)
    spread = torch.tensor([0.5, 4.0], device=device).repeat(rows // 2 + 1)[:rows, None]  # logit std of each row
    threshold = math.log(vocab) - 1  # flat rows: about log(vocab) - 0.125 nats; peaked: far below
    inputs = [((torch.randn(rows, vocab, device=device, generator=generator) * spread).to(dtype), threshold)
              for _ in range(sets)]
    return BenchCase(
        name=f"entropy_boundary[{rows}x{vocab}]", inputs=inputs, triton=entropy_boundary_triton,
        baseline=entropy_boundary_reference,
        bytes_moved=rows * vocab * dtype.itemsize + rows * (4 + 1),  # logits in; entropy and decision out
        tolerance=TOLERANCE[dtype],
    )
