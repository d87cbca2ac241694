"""What a measurement ran on, as the study and the benchmarks record it."""

from __future__ import annotations

import platform

import torch


def machine() -> dict:
    """The platform, processor, torch version and threads of this process."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
