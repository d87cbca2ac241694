"""Which implementation a kernel call runs: the Triton kernel or its PyTorch reference.

Modes (``KernelMode``):

- ``auto`` (the default): Triton for CUDA tensors, the reference everywhere
  else, so the same model code runs on CPU and GPU replicas;
- ``triton``: always Triton. On CPU tensors that needs Triton's interpreter
  (``TRITON_INTERPRET=1`` set before triton is imported), which is how the
  tests run every kernel on a machine without a GPU;
- ``reference``: never Triton (to rule the kernels out when a GPU result
  looks wrong).

The mode comes from the ``PATCHWORK_KERNELS`` environment variable when the
process starts (Ray workers inherit it from the process that starts the
cluster), or from ``configure`` and, for a block of code, ``forced``.
``launches`` counts the Triton launches of each kernel: the proof, for tests
and benchmarks, that the Triton path really ran.
"""

from __future__ import annotations

import enum
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

try:
    import triton
except ImportError:  # pragma: no cover - triton is a declared dependency
    triton = None

ENVIRONMENT_VARIABLE = "PATCHWORK_KERNELS"


class KernelMode(str, enum.Enum):
    AUTO = "auto"
    TRITON = "triton"
    REFERENCE = "reference"


class KernelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: KernelMode = KernelMode.AUTO


def settings_from_environment() -> KernelSettings:
    value = os.environ.get(ENVIRONMENT_VARIABLE, KernelMode.AUTO.value)
    try:
        return KernelSettings(mode=value)
    except ValidationError:
        modes = ", ".join(mode.value for mode in KernelMode)
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r}: expected one of {modes}") from None


_settings = settings_from_environment()
launches: Counter[str] = Counter()


def mode() -> KernelMode:
    return _settings.mode


def configure(new_mode: KernelMode | str) -> None:
    """Sets the mode for the whole process."""
    global _settings
    _settings = KernelSettings(mode=new_mode)


@contextmanager
def forced(new_mode: KernelMode | str) -> Iterator[None]:
    """The mode inside a block of code, then the one before it."""
    before = _settings.mode
    configure(new_mode)
    try:
        yield
    finally:
        configure(before)


def use_triton(x: torch.Tensor, *others: torch.Tensor, differentiable: bool = False) -> bool:
    """Whether a kernel call on ``x`` (and ``others``, its other tensor
    inputs) runs Triton. A kernel without a backward (``differentiable``
    False) leaves a call that must record gradients (gradients on and an
    input that requires them) to the reference, which autograd
    differentiates, in every mode: forcing Triton never drops gradients."""
    current = _settings.mode
    if current is KernelMode.REFERENCE:
        return False
    records_gradients = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *others))
    if records_gradients and not differentiable:
        return False
    if triton is None:
        if current is KernelMode.TRITON:
            raise RuntimeError(f"{ENVIRONMENT_VARIABLE}=triton, but triton is not installed")
        return False
    return current is KernelMode.TRITON or x.is_cuda


def launched(kernel: str) -> None:
    """Counts one launch of ``kernel`` (its Triton wrapper calls this)."""
    launches[kernel] += 1
