"""The Ray Serve config file of a Patchwork setup, and deploying it.

``deploy_config`` turns a ``ServingConfig`` into the multi-application
config that Ray's ``serve run FILE`` and ``serve deploy FILE`` accept: the
proxies' options, one application whose builder (``serving.app:build``)
receives the whole ServingConfig as its args, and a ``deployments`` entry
per deployment with its replicas, autoscaling, admission bounds and Ray
resources, which operators may edit in place. ``patchwork serve up``
deploys the same file through the same controller call that ``serve run``
makes, so a running setup is always one such file (``patchwork serve
scale`` changes a replica count by re-applying it, which Ray Serve does
without restarting running replicas).

    patchwork serve config [--setup cpu|gpu|autoscale] [--checkpoints DIR] [--out FILE]
"""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from patchwork.engines.registry import register
from patchwork.serving.config import (
    APP_NAME,
    GATEWAY,
    ROUTE_PREFIX,
    ActorOptions,
    AutoscalingConfig,
    DeploymentOptions,
    ServingConfig,
    model_deployment,
)
from patchwork.serving.grpc_services import known_services, servicer_functions

# Seconds a replica being stopped waits beyond the drain grace period before
# Ray Serve stops it anyway (the engine has ended its requests by then).
SHUTDOWN_MARGIN_S = 10.0
# What a running deployment is told by `reconfigure` (Ray Serve's user_config):
# whether it is draining, and until when (a Unix time).
SERVING = {"draining_until": None}


def setup(name: str, checkpoints: Path = Path("checkpoints")) -> ServingConfig:
    """The shipped setups: ``cpu`` (one CPU per model; ``auto`` runs every
    model in the gateway's replica), ``gpu`` (one GPU replica per model,
    bfloat16 and the Triton kernels), ``autoscale`` (CPU replicas between 1
    and 4 per model, following ongoing requests)."""
    if name == "cpu":
        return ServingConfig(checkpoints=checkpoints)
    if name == "gpu":
        gpu = ActorOptions(num_cpus=1.0, num_gpus=1.0)
        return ServingConfig(checkpoints=checkpoints, device="cuda", models=DeploymentOptions(ray_actor_options=gpu))
    if name == "autoscale":
        scaling = AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=8)
        return ServingConfig(checkpoints=checkpoints, models=DeploymentOptions(autoscaling_config=scaling))
    raise ValueError(f"unknown setup {name!r}; expected cpu, gpu or autoscale")


def deployment_entry(name: str, options: DeploymentOptions, drain_grace_s: float) -> dict:
    entry = {"name": name}
    if options.autoscaling_config is not None:
        entry["autoscaling_config"] = options.autoscaling_config.model_dump()
    else:
        entry["num_replicas"] = options.num_replicas
    entry["max_ongoing_requests"] = options.max_ongoing_requests
    entry["max_queued_requests"] = options.max_queued_requests
    entry["user_config"] = dict(SERVING)
    entry["health_check_period_s"] = options.health_check_period_s
    entry["health_check_timeout_s"] = options.health_check_timeout_s
    # A replica being stopped (scale-down, `serving down`) first lets its requests finish.
    entry["graceful_shutdown_wait_loop_s"] = 0.5
    entry["graceful_shutdown_timeout_s"] = drain_grace_s + SHUTDOWN_MARGIN_S
    entry["ray_actor_options"] = options.ray_actor_options.model_dump()
    return entry


def deploy_config(config: ServingConfig, models: list[str]) -> dict:
    """The Ray Serve config (a ServeDeploySchema, as plain data) of ``config``
    serving ``models``; the proxy registers the services of every known family."""
    register(config.families)
    document = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": config.http_port},
        "grpc_options": {
            "port": config.grpc_port,
            "grpc_servicer_functions": servicer_functions(known_services()),
            "request_timeout_s": config.request_timeout_s,
        },
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": ROUTE_PREFIX,
                "import_path": "patchwork.serving.app:build",
                "args": {"config": config.model_dump(mode="json")},
                "deployments": [deployment_entry(GATEWAY, config.gateway_for(models), config.drain_grace_s)]
                + [deployment_entry(model_deployment(m), config.options_for(m), config.drain_grace_s)
                   for m in sorted(set(models) - set(config.in_gateway(models)))],
            }
        ],
    }
    ServeDeploySchema.model_validate(document)
    return document


def to_yaml(document: dict) -> str:
    return yaml.safe_dump(document, sort_keys=False)


def apply(document: dict) -> None:
    """Starts Serve's proxies if needed and deploys ``document`` on the
    connected Ray cluster, as ``serve run FILE --non-blocking`` does."""
    from ray.serve._private import api as private_api
    from ray.serve.config import gRPCOptions

    schema = ServeDeploySchema.model_validate(document)
    client = private_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)


def running_config() -> dict:
    """The config file of the setup running on the connected cluster."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    application = details["applications"][APP_NAME]["deployed_app_config"]
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": details["http_options"]["host"], "port": details["http_options"]["port"]},
        "grpc_options": {
            "port": details["grpc_options"]["port"],
            "grpc_servicer_functions": details["grpc_options"]["grpc_servicer_functions"],
            "request_timeout_s": details["grpc_options"].get("request_timeout_s"),
        },
        "applications": [application],
    }


def with_drain(document: dict, until: float | None, grace_s: float) -> dict:
    """``document`` with every deployment draining until ``until`` (a Unix
    time; None: serving), and given ``grace_s`` plus a margin to finish its
    requests when stopped. Ray Serve applies both to running replicas in place,
    without restarting them."""
    for entry in document["applications"][0].setdefault("deployments", []):
        entry["user_config"] = {**SERVING, "draining_until": until}
        entry["graceful_shutdown_timeout_s"] = grace_s + SHUTDOWN_MARGIN_S
    return document


def with_replicas(document: dict, deployment: str, replicas: int) -> dict:
    """``document`` with a fixed replica count for ``deployment`` (replacing any autoscaling)."""
    application = document["applications"][0]
    entries = application.setdefault("deployments", [])
    names = [entry["name"] for entry in entries]
    if deployment not in names:
        raise KeyError(f"no deployment {deployment!r}; this application has {names}")
    for entry in entries:
        if entry["name"] == deployment:
            entry.pop("autoscaling_config", None)
            entry["num_replicas"] = replicas
    return document
