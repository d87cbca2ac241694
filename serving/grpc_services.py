"""Registers Patchwork's gRPC services on Ray Serve's gRPC proxy.

Ray Serve config files name these functions in ``grpc_servicer_functions``;
the proxy calls them when it starts its gRPC server. Each installs the edge
(``serving.edge``) around the proxy's handlers, then registers its service.
They are the generated ``add_*Servicer_to_server`` functions except for one
thing: requests reach the gateway as raw bytes (``request_deserializer=None``)
and the gateway parses them itself, so a payload that is not a valid message
gets INVALID_ARGUMENT from Patchwork rather than an opaque failure inside the
proxy.
"""

from __future__ import annotations

import grpc

from serving import edge


def _register(server, service: str, handlers: dict) -> None:
    edge.install(server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


def add_ByteLM_to_server(servicer, server) -> None:  # noqa: N802 (gRPC naming)
    from patchwork.v1 import bytelm_pb2 as pb2

    _register(server, "patchwork.v1.ByteLM", {
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


def add_Models_to_server(servicer, server) -> None:  # noqa: N802 (gRPC naming)
    from patchwork.v1 import models_pb2

    _register(server, "patchwork.v1.Models", {
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels, request_deserializer=None,
            response_serializer=models_pb2.ListModelsResponse.SerializeToString),
    })


def add_Health_to_server(servicer, server) -> None:  # noqa: N802 (gRPC naming)
    """The standard grpc.health.v1.Health service, behind the edge too."""
    from grpc_health.v1 import health_pb2_grpc

    edge.install(server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
