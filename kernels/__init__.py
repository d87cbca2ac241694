"""Hot-path kernels, each beside the plain PyTorch reference it must match.

One module per kernel: ``rmsnorm``, ``add_rmsnorm`` (with its backward),
``entropy`` (BLT's entropy and patch boundary), ``hash_embedding`` (BLT's
hash n-gram embedding), ``grouped_linear`` (MoT's modality-grouped linear),
``guidance`` (CM3Leon's guidance combine). Each module's dispatch function
runs the Triton kernel or the reference as ``kernels.dispatch`` decides (by
default: Triton for CUDA tensors, the reference elsewhere), so the same
model code runs on CPU and GPU replicas; ``kernels.bench`` measures them.
"""

from __future__ import annotations

import torch

from kernels import dispatch
from kernels.rmsnorm import rms_norm_reference, rms_norm_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if dispatch.use_triton(x, weight):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


__all__ = ["dispatch", "rms_norm", "rms_norm_reference", "rms_norm_triton"]
