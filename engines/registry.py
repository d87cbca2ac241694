"""Model families: the config type of each, its checkpoint format version and
how to build its engine.

A family is the sub-package ``patchwork.engines.<name>`` whose ``engine``
module defines ``FAMILY`` (a ``Family``): every such sub-package is one of
Patchwork's own families, found by looking, so adding one edits no list
here. ``register`` adds a family defined elsewhere (serving registers
``ServingConfig.families`` in every replica). Modules are imported on first
use. What serving and training do with a family (its gRPC services and
deployment class, its trainer) is theirs to say: ``patchwork.serving.families``
and ``patchwork.training.__main__``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch

    from patchwork.engines.api import Engine
    from patchwork.engines.checkpoint import Manifest

# family name -> module that defines FAMILY: every engines/<name>/engine.py
_FAMILY_MODULES = {path.parent.name: f"patchwork.engines.{path.parent.name}.engine"
                   for path in sorted(Path(__file__).parent.glob("*/engine.py"))}


class EngineBuilder(Protocol):
    """Builds a family's engine from its validated config and weights;
    ``options`` are the engine's own (e.g. ``scheduler=SchedulerConfig(...)``),
    and ``assets`` (the checkpoint's extra files, name -> text) when it has any."""

    def __call__(
        self, config: Any, weights: dict[str, torch.Tensor], *, device: torch.device, dtype: torch.dtype, name: str,
        manifest: Manifest | None = None, **options: Any,
    ) -> Engine: ...


@dataclass(frozen=True)
class Family:
    name: str
    config_type: type[BaseModel]
    format_version: int
    build_engine: EngineBuilder


def register(families: dict[str, str]) -> None:
    """Makes families known: family name -> the module (importable wherever
    its models load) that defines its ``FAMILY``."""
    for name, module in families.items():
        known = _FAMILY_MODULES.get(name)
        if known is not None and known != module:
            raise ValueError(f"family {name!r} is already defined by {known}, not {module}")
        _FAMILY_MODULES[name] = module


def known_families() -> list[str]:
    return sorted(_FAMILY_MODULES)


def family_module(name: str) -> str | None:
    """The module that defines family ``name``'s ``FAMILY``, if it is known."""
    return _FAMILY_MODULES.get(name)


def get_family(name: str) -> Family | None:
    module = _FAMILY_MODULES.get(name)
    if module is None:
        return None
    family = importlib.import_module(module).FAMILY
    if family.name != name:
        raise ValueError(f"{module} defines family {family.name!r}, not {name!r}")
    return family
