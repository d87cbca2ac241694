"""What serving needs of each model family: the gRPC services its models
answer, which of their RPCs, and the class its replicas run.

A family not listed in ``SERVED`` is served as a byte generator: ByteLM's
``Generate`` and ``GenerateStream``, by the plain ``ModelServer``. So a new
family that only generates needs nothing here; one with a service of its
own adds its line. A family defined outside Patchwork (``ServingConfig.families``)
puts a ``SERVING`` (a ``ServedFamily``) beside its ``FAMILY`` in its module.
This module imports nothing heavy: the gateway and the config writer read it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from patchwork.engines.registry import family_module

# The generation RPCs of patchwork.v1.ByteLM that every GenerativeEngine answers.
GENERATION_RPCS = frozenset({"Generate", "GenerateStream"})
BYTELM_SERVICE = "patchwork.serving.bytelm:SERVICE"
MODEL_SERVER = "patchwork.serving.model_server:ModelServer"


@dataclass(frozen=True)
class ServedFamily:
    # The gRPC services its models answer ("module:attribute" of each
    # ``GrpcService``; the gateway answers every RPC of every known family's services) ...
    services: tuple[str, ...] = (BYTELM_SERVICE,)
    # ... and which of their RPCs; the gateway refuses the others with
    # INVALID_ARGUMENT naming the model and its family.
    rpcs: frozenset[str] = GENERATION_RPCS
    # The class ("module:attribute") its models' replicas run: a
    # ``ModelServer``, or a subclass with the methods its services' handlers call.
    deployment: str = MODEL_SERVER


SERVED = {
    "blt": ServedFamily(rpcs=GENERATION_RPCS | {"Score"}),
    "cm3leon": ServedFamily(services=("patchwork.serving.multimodal:SERVICE",),
                            rpcs=frozenset({"GenerateImage", "Caption", "Infill"}),
                            deployment="patchwork.serving.multimodal:Cm3LeonServer"),
    "mavil": ServedFamily(services=("patchwork.serving.audiovideo:SERVICE",),
                          rpcs=frozenset({"Embed", "Classify", "Retrieve"}),
                          deployment="patchwork.serving.audiovideo:MavilServer"),
}


def served_family(name: str) -> ServedFamily:
    """How family ``name`` (a known one: ``patchwork.engines.registry``) is served."""
    if name in SERVED:
        return SERVED[name]
    module = family_module(name)
    if module is None:
        raise KeyError(f"unknown family {name!r}")
    return getattr(importlib.import_module(module), "SERVING", ServedFamily())
