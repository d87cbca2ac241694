"""Model families: the config type of each, how to build its engine, the
gRPC services and RPCs it answers, the deployment it is served by, and its
trainer.

A family lives in one module that defines ``FAMILY`` (a ``Family``).
Patchwork's own families are listed here; ``register`` adds one defined
elsewhere (serving registers ``ServingConfig.families`` in every replica).
Modules are imported on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch

    from engines.api import Engine
    from engines.checkpoint import Manifest

# family name -> module that defines FAMILY
_FAMILY_MODULES = {"blt": "engines.blt.engine", "cm3leon": "engines.cm3leon.engine", "mavil": "engines.mavil.engine"}

# The generation RPCs of patchwork.v1.ByteLM that every GenerativeEngine answers.
GENERATION_RPCS = frozenset({"Generate", "GenerateStream"})
BYTELM_SERVICE = "serving.bytelm:SERVICE"
MODEL_SERVER = "serving.model_server:ModelServer"


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
    # The gRPC services its models answer ("module:attribute" of each
    # ``serving.grpc_services.GrpcService``; the gateway answers every RPC of
    # every served family's services) ...
    services: tuple[str, ...] = (BYTELM_SERVICE,)
    # ... and which of their RPCs; the gateway refuses the others with
    # INVALID_ARGUMENT naming the model and its family.
    rpcs: frozenset[str] = GENERATION_RPCS
    # The class ("module:attribute") its models' replicas run: a
    # ``serving.model_server.ModelServer``, or a subclass with the methods
    # its services' handlers call.
    deployment: str = MODEL_SERVER
    # The module behind `python -m training <name>` (``add_arguments(parser)``
    # and ``run(args, argv) -> exit code``), if the family trains here.
    trainer: str | None = None


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


def get_family(name: str) -> Family | None:
    module = _FAMILY_MODULES.get(name)
    if module is None:
        return None
    family = importlib.import_module(module).FAMILY
    if family.name != name:
        raise ValueError(f"{module} defines family {family.name!r}, not {name!r}")
    return family
