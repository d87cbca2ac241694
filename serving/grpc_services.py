"""gRPC services: what each one is, and registering it on Ray Serve's gRPC proxy.

A ``GrpcService`` names a service, the RPCs it has, the gateway methods that
answer them (a mixin class; Ray Serve's proxy routes an RPC to the ingress
method of the same name) and the function the proxy calls to register it.
Every family names the services its models answer (``serving.families``);
``serving.app`` builds the gateway from the mixins of all of them, and
``serving.deploy`` lists their functions in the Ray Serve config file's
``grpc_servicer_functions``. ``Models`` and ``Health`` belong to the gateway
itself.

The registering functions of Patchwork's services live here, in a module
that imports nothing heavy: Ray Serve's proxy imports them when it starts,
and it has 60 seconds to come up. They are the generated
``add_*Servicer_to_server`` functions except for two things: the edge (``serving.edge``) is installed
around the proxy's handlers first, and requests reach the gateway as raw bytes
(``request_deserializer=None``) and the gateway parses them itself, so a
payload that is not a valid message gets INVALID_ARGUMENT from Patchwork
rather than an opaque failure inside the proxy.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from patchwork.serving import edge

if TYPE_CHECKING:
    from patchwork.serving.families import ServedFamily

# The gateway's own services, registered whatever the families.
GATEWAY_SERVICERS = (
    "patchwork.serving.grpc_services.add_Models_to_server",
    "patchwork.serving.grpc_services.add_Health_to_server",
)


@dataclass(frozen=True)
class GrpcService:
    name: str  # the full service name, e.g. "patchwork.v1.ByteLM"
    rpcs: frozenset[str]
    handlers: type  # the gateway mixin with one async method per RPC
    add_to_server: str  # import path of the function the proxy calls to register it

    def __post_init__(self) -> None:
        missing = sorted(rpc for rpc in self.rpcs if not callable(getattr(self.handlers, rpc, None)))
        if missing:
            raise ValueError(f"{self.handlers.__name__} does not answer {self.name}'s {', '.join(missing)}")


def load_object(path: str):
    """The object at ``"module:attribute"``."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def services_of(families: Mapping[str, ServedFamily]) -> list[GrpcService]:
    """The services the families' models answer (family name -> how it is
    served), each once, in a stable order."""
    found: dict[str, GrpcService] = {}
    for name, family in families.items():
        for path in family.services:
            service = load_object(path)
            if found.setdefault(service.name, service) is not service:
                raise ValueError(f"two services are named {service.name}")
        undefined = family.rpcs - {rpc for path in family.services for rpc in load_object(path).rpcs}
        if undefined:
            raise ValueError(f"family {name} serves {sorted(undefined)}, which none of its services has")
    services = sorted(found.values(), key=lambda service: service.name)
    rpcs = [rpc for service in services for rpc in service.rpcs]
    clashes = sorted({rpc for rpc in rpcs if rpcs.count(rpc) > 1})
    if clashes:  # Ray Serve routes by method name alone
        raise ValueError(f"RPC names must be unique across services; {', '.join(clashes)} are not")
    return services


def known_services() -> list[GrpcService]:
    """The services of every known family: what the gateway answers and the
    proxy registers (both from this one list, so they always agree)."""
    from patchwork.engines.registry import known_families
    from patchwork.serving.families import served_family

    return services_of({name: served_family(name) for name in known_families()})


def servicer_functions(services: Iterable[GrpcService]) -> list[str]:
    """The Ray Serve config's ``grpc_servicer_functions`` for these services."""
    return [service.add_to_server for service in services] + list(GATEWAY_SERVICERS)


def register(server, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
    """Registers a service's method handlers on the proxy's server, behind the edge."""
    edge.install(server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def add_ByteLM_to_server(servicer, server) -> None:  # noqa: N802 (gRPC naming)
    from patchwork.v1 import bytelm_pb2 as pb2

    register(server, "patchwork.v1.ByteLM", {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=None,
            response_serializer=pb2.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=None,
            response_serializer=pb2.GenerateStreamChunk.SerializeToString),
        "Score": grpc.unary_unary_rpc_method_handler(
            servicer.Score, request_deserializer=None,
            response_serializer=pb2.ScoreResponse.SerializeToString),
    })


def add_Multimodal_to_server(servicer, server) -> None:  # noqa: N802 (gRPC naming)
    from patchwork.v1 import multimodal_pb2 as pb2

    register(server, "patchwork.v1.Multimodal", {
        "GenerateImage": grpc.unary_unary_rpc_method_handler(
            servicer.GenerateImage, request_deserializer=None,
            response_serializer=pb2.GenerateImageResponse.SerializeToString),
        "Caption": grpc.unary_unary_rpc_method_handler(
            servicer.Caption, request_deserializer=None, response_serializer=pb2.CaptionResponse.SerializeToString),
        "Infill": grpc.unary_unary_rpc_method_handler(
            servicer.Infill, request_deserializer=None, response_serializer=pb2.InfillResponse.SerializeToString),
    })


def add_AudioVideo_to_server(servicer, server) -> None:  # noqa: N802 (gRPC naming)
    from patchwork.v1 import audiovideo_pb2 as pb2

    register(server, "patchwork.v1.AudioVideo", {
        "Embed": grpc.unary_unary_rpc_method_handler(
            servicer.Embed, request_deserializer=None, response_serializer=pb2.EmbedResponse.SerializeToString),
        "Classify": grpc.unary_unary_rpc_method_handler(
            servicer.Classify, request_deserializer=None, response_serializer=pb2.ClassifyResponse.SerializeToString),
        "Retrieve": grpc.unary_unary_rpc_method_handler(
            servicer.Retrieve, request_deserializer=None, response_serializer=pb2.RetrieveResponse.SerializeToString),
    })


def add_Models_to_server(servicer, server) -> None:  # noqa: N802 (gRPC naming)
    from patchwork.v1 import models_pb2

    register(server, "patchwork.v1.Models", {
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=None,
            response_serializer=models_pb2.ListModelsResponse.SerializeToString),
    })


def add_Health_to_server(servicer, server) -> None:  # noqa: N802 (gRPC naming)
    """The standard grpc.health.v1.Health service, behind the edge too."""
    from grpc_health.v1 import health_pb2_grpc

    edge.install(server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
