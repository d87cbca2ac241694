"""Where Ray Serve's gRPC servers listen.

Ray Serve 2.60 binds its gRPC proxy and each direct-ingress gateway replica to
``[::]`` (every interface) and each replica's inter-deployment server to
``[::]:0``, and has no setting for either. ``install``, a Ray worker setup hook
(``runtime_env["worker_process_setup_hook"]``, so it runs in every process of
the cluster before an actor starts), rebinds them:

- the public gRPC servers (proxy, direct ingress) to ``$PATCHWORK_GRPC_HOST``
  (``ServingConfig.host``: loopback unless the operator opens them);
- the replicas' inter-deployment servers to ``$PATCHWORK_INTERNAL_HOST`` (the
  node's own address: loopback on the single-machine cluster `patchwork
  serve up` starts), where Ray's mutual TLS (``cluster_tls``) guards them too.

A variable that is not set leaves Ray's binding as it is. The module imports
nothing of Ray until the hook runs, so that every worker can import it cheaply.
"""

from __future__ import annotations

import ipaddress
import os

HOST_ENV, INTERNAL_HOST_ENV = "PATCHWORK_GRPC_HOST", "PATCHWORK_INTERNAL_HOST"
SETUP_HOOK = "patchwork.serving.binding.install"
_EVERY_INTERFACE = "[::]:"


def address(host: str, port: int | str) -> str:
    """``host:port`` as gRPC reads it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ipaddress.ip_address(host).version == 6 else f"{host}:{port}"


def _rebinding(bind, host: str):
    """``bind(server, address)`` with every ``[::]:port`` address moved to ``host``."""
    def rebound(server, where: str):
        if where.startswith(_EVERY_INTERFACE):
            where = address(host, where[len(_EVERY_INTERFACE):])
        return bind(server, where)

    rebound.patchwork_host = host
    return rebound


def install() -> None:
    """The setup hook: rebinds Ray Serve's gRPC servers in this process (see the module)."""
    public, internal = os.environ.get(HOST_ENV), os.environ.get(INTERNAL_HOST_ENV)
    if internal:
        # First, before anything imports Ray Serve's replica module: it takes this
        # function by name then, and so binds through the rebinding one.
        from ray._common import tls_utils

        if not hasattr(tls_utils.add_port_to_grpc_server, "patchwork_host"):
            tls_utils.add_port_to_grpc_server = _rebinding(tls_utils.add_port_to_grpc_server, internal)
    if public:
        from ray.serve._private import default_impl

        if not hasattr(default_impl.add_grpc_address, "patchwork_host"):
            default_impl.add_grpc_address = _rebinding(default_impl.add_grpc_address, public)
