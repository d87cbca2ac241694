"""Starting the local Ray cluster a Patchwork setup runs on.

Some settings live outside Ray Serve's config file, in the cluster's
processes, and are set here before Ray starts:

- ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE``: Ray Serve's gRPC servers (the proxy and
  the gateway replicas' own) refuse messages larger than the setup's limits
  need (``Limits.max_message_bytes``) before they reach Patchwork; Ray's
  default is 2 GiB.
- the node's address: with ``metrics_host`` 127.0.0.1 the local cluster is a
  single-machine cluster whose node address is loopback
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, what Ray does by itself on macOS
  and Windows), so Ray's metrics exporter and its other ports listen on
  loopback only.
- where Ray Serve's gRPC servers listen (``serving.binding``, a worker setup
  hook every process of the cluster runs): the proxy and the gateway
  replicas' own ports on ``ServingConfig.host``, each replica's
  inter-deployment port on the node's address.
- mutual TLS between all of the cluster's processes (``serving.cluster_tls``):
  Ray's variables for the cluster's CA, certificate and key, which every
  process that joins the cluster (a driver of ``patchwork serve down`` too)
  takes the same way.

- direct ingress (``ServingConfig.ingress``): ``RAY_SERVE_ENABLE_DIRECT_INGRESS``
  and the range of ports gateway replicas answer gRPC on, from
  ``direct_grpc_port`` up (HTTP from ``DIRECT_HTTP_PORT`` up, which
  Patchwork does not use). A stopping gateway replica drains by Patchwork's
  own drain (``drain_grace_s``), not by Ray's 30 s minimum
  (``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=0``), and the port it
  leaves is free at once (``RAY_SERVE_PORT_QUARANTINE_S=0``; Ray keeps it
  for its HAProxy otherwise), so a replaced replica answers where the one
  before it did.
- ``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S``: how long Ray Serve's controller
  waits for a new gRPC proxy to start before killing it (Ray's 5 s is too
  short for a small machine under load, and a killed first proxy fails the
  whole start).

A cluster started by other means (``ray start`` for ``serve deploy``) gets the
same behaviour when its processes have that environment and node address.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

from patchwork.serving import binding, cluster_tls
from patchwork.serving.config import DIRECT_PORTS, ServingConfig

LOOPBACK = "127.0.0.1"
PROXY_READY_TIMEOUT_S = 60.0
# Gateway replicas' own HTTP servers (direct ingress starts them; Patchwork serves gRPC only).
DIRECT_HTTP_PORT = 30000


def cluster_environment(config: ServingConfig) -> dict[str, str]:
    """Environment variables the cluster's processes need for ``config`` (TLS's apart: ``start``)."""
    loopback = config.metrics_host == LOOPBACK
    return {
        binding.HOST_ENV: config.plaintext_host(),
        **({binding.INTERNAL_HOST_ENV: LOOPBACK} if loopback else {}),
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(config.limits.max_message_bytes),
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": str(PROXY_READY_TIMEOUT_S),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0" if loopback else "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1" if config.ingress == "direct" else "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(config.direct_grpc_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(config.direct_grpc_port + DIRECT_PORTS),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(DIRECT_HTTP_PORT),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(DIRECT_HTTP_PORT + DIRECT_PORTS),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
    }


class ClusterError(RuntimeError):
    """The cluster could not be started or joined; the message says why."""


def ray_command(*args: str) -> None:
    run = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    if run.returncode != 0:
        said = " ".join(run.stdout.strip().splitlines()[-3:])
        raise ClusterError(f"`ray {' '.join(args)}` failed: {said}")


def _loopback_nodes(on: bool) -> None:
    """Whether this process treats the local node as loopback (read by Ray when
    imported; this process may have imported it already)."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0" if on else "1"
    ray_constants.ENABLE_RAY_CLUSTER = not on


def _join(addresses: list[str]) -> dict:
    """What a process that starts or joins the cluster needs first: Ray's TLS
    variables (in this process's environment, which the cluster's processes
    inherit) and, for ``ray.init``, the runtime environment with the setup hook."""
    os.environ.update(cluster_tls.environment(addresses))
    return {"runtime_env": {"worker_process_setup_hook": binding.SETUP_HOOK}}


def _refuses_this_process(gcs_address: str, timeout_s: float = 30.0) -> bool:
    """Whether the cluster's GCS fails this process's first connection with
    its TLS settings (Ray's own client would retry a refused handshake for
    many minutes); False when it connects, or says nothing in ``timeout_s``
    (then ``ray.init`` decides)."""
    import threading

    import grpc

    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        files = [Path(os.environ[name]).read_bytes() for name in
                 ("RAY_TLS_CA_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_SERVER_CERT")]
        channel = grpc.secure_channel(gcs_address, grpc.ssl_channel_credentials(*files))
    else:
        channel = grpc.insecure_channel(gcs_address)
    settled, states = threading.Event(), []

    def seen(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE):
            states.append(state)
            settled.set()

    with channel:
        channel.subscribe(seen, try_to_connect=True)
        settled.wait(timeout_s)
        channel.unsubscribe(seen)
    return states[:1] == [grpc.ChannelConnectivity.TRANSIENT_FAILURE]


def connect(**init_options) -> None:
    """Connects to the local cluster a setup runs on (``ray.init(address="auto")``).
    A client must see the local node as the cluster does: Ray would otherwise
    turn the loopback address it recorded into the machine's own address.
    Loopback mode reaches a cluster on either kind of address. ClusterError
    when the running cluster does not take this process's certificates
    (another state directory's); ConnectionError when none runs."""
    import ray
    from ray._private.services import get_ray_address_from_environment

    if not ray.is_initialized():
        _loopback_nodes(True)
        joining = _join([LOOPBACK])
        try:
            gcs_address = get_ray_address_from_environment("auto", None)
        except ConnectionError:
            gcs_address = None  # ray.init says that none runs
        if gcs_address not in (None, "auto") and _refuses_this_process(gcs_address):
            raise ClusterError(f"the Ray cluster at {gcs_address} does not let this process in with the "
                               f"certificates in {cluster_tls.state_dir()}: run the command with the "
                               f"{cluster_tls.STATE_ENV} the cluster was started with")
        ray.init(address="auto", **{"logging_level": "WARNING", **joining, **init_options})


def cpus_needed(config: ServingConfig, models: list[str]) -> int:
    """Logical CPUs that the first replicas of ``models`` and the gateway ask for together."""
    def replicas(options) -> int:
        scaling = options.autoscaling_config
        return options.num_replicas if scaling is None else max(1, scaling.min_replicas)

    remote = sorted(set(models) - set(config.in_gateway(models)))
    deployments = [config.gateway_for(models), *(config.options_for(model) for model in remote)]
    return math.ceil(sum(options.ray_actor_options.num_cpus * replicas(options) for options in deployments))


def local_cpus(config: ServingConfig, models: list[str]) -> int:
    """The CPUs a local cluster advertises: the machine's cores, or as many as
    the setup's first replicas ask for when that is more, so every model gets
    a replica on a small machine (they share its cores then)."""
    return max(os.cpu_count() or 1, cpus_needed(config, models))


def start(config: ServingConfig, num_cpus: int | None = None, detach: bool = False, **init_options) -> None:
    """Starts a local Ray cluster for ``config`` and connects to it. With
    ``detach`` it outlives this process (``ray start``); otherwise it stops
    with it."""
    import ray

    os.environ.update(cluster_environment(config))
    loopback = config.metrics_host == LOOPBACK
    _loopback_nodes(loopback)
    # Before any of the cluster's processes starts: they inherit the TLS variables.
    joining = _join([LOOPBACK] if loopback else [LOOPBACK, ray.util.get_node_ip_address()])
    if detach:
        ray_command("start", "--head", "--include-dashboard=false", "--disable-usage-stats",
                    f"--metrics-export-port={config.metrics_port}",
                    *([f"--num-cpus={num_cpus}"] if num_cpus else []))
        connect(**init_options)
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=config.metrics_port,
             **{"logging_level": "WARNING", **joining, **init_options})
