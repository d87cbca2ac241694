"""What ``benchmarks.kernels`` needs from each kernel module: ``bench_case``
builds a ``BenchCase``, the kernel's measurement at one size."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# BLT's byte vocabulary (256 bytes and 4 special symbols): the size the byte-level kernels run at.
BYTE_VOCAB = 260


@dataclass
class BenchCase:
    """One kernel at one size. ``inputs`` holds several independent sets of
    arguments: the benchmark cycles through them so that what one call reads
    is not left in the L2 cache by the call before. ``triton`` and
    ``baseline`` (the torch eager code the kernel replaces) take one set and
    must return equal results within ``tolerance`` (atol, rtol). ``bytes_moved``
    is the least memory traffic one call needs (each input read once, each
    output written once); ``flops`` is set for the kernels bound by compute,
    with ``dense``, the dense operation of the same total size on one set
    (e.g. one matmul) whose FLOP/s the kernel's is compared with."""

    name: str
    inputs: list[tuple[Any, ...]]
    triton: Callable[..., Any]
    baseline: Callable[..., Any]
    bytes_moved: int
    tolerance: tuple[float, float]
    flops: int = 0
    dense: Callable[..., Any] | None = None


def sets_beyond_cache(set_bytes: int, device) -> int:
    """How many input sets of ``set_bytes`` a case needs so that cycling
    through them reads more than twice the GPU's L2 cache (2 elsewhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, -(-2 * l2_bytes // set_bytes))
