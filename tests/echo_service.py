"""Registers the test family's ``patchwork.test.Echo`` service on the proxy
(a light module: Ray Serve's proxy imports it when it starts)."""

from __future__ import annotations

import grpc

from patchwork.serving.grpc_services import register


def add_Echo_to_server(servicer, server) -> None:  # noqa: N802 (gRPC naming)
    from google.protobuf import struct_pb2

    register(server, "patchwork.test.Echo", {
        "Reverse": grpc.unary_unary_rpc_method_handler(
            servicer.Reverse, request_deserializer=None, response_serializer=struct_pb2.Struct.SerializeToString),
    })
