"""Builds the Ray Serve application: one gateway plus one deployment per model.

Every checkpoint directory directly under ``ServingConfig.checkpoints`` is a
model, named after its directory, served by its own deployment
(``model-<name>``) with the replicas and resources of ``ServingConfig.models``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ray import serve
from ray.serve.config import gRPCOptions

from engines.checkpoint import CONFIG_FILE, CheckpointError, read_header, read_manifest
from engines.registry import get_family
from serving.config import ServingConfig
from serving.gateway import Gateway
from serving.model_server import ModelServer

GRPC_SERVICERS = [
    "patchwork.v1.bytelm_pb2_grpc.add_ByteLMServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def discover_checkpoints(root: Path) -> dict[str, Path]:
    """Model name -> checkpoint directory, for every valid checkpoint under ``root``
    (``root`` itself may be a checkpoint). Raises CheckpointError when a
    directory that looks like a checkpoint is broken, or when there is none."""
    root = Path(root)
    if (root / CONFIG_FILE).exists():
        candidates = [root]
    elif root.is_dir():
        candidates = sorted(p for p in root.iterdir() if p.is_dir() and (p / CONFIG_FILE).exists())
    else:
        candidates = []
    models = {}
    for path in candidates:
        read_manifest(path)
        header, _ = read_header(path)
        if get_family(header.family) is None:
            raise CheckpointError(f"{path / CONFIG_FILE}: unknown family {header.family!r}")
        if not _SAFE_NAME.fullmatch(path.name):
            raise CheckpointError(f"{path}: model names may hold letters, digits, '.', '_' and '-' only")
        models[path.name] = path.resolve()
    if not models:
        raise CheckpointError(
            f"{root}: no checkpoints found; train one with "
            f"`python -m training blt --preset default --out {root / 'blt-default'}`"
        )
    return models


def default_model(models: dict[str, Path], config: ServingConfig) -> str:
    if config.default_model is not None:
        if config.default_model not in models:
            raise CheckpointError(f"default model {config.default_model!r} is not among {sorted(models)}")
        return config.default_model
    return sorted(models)[0]


def build_app(config: ServingConfig):
    models = discover_checkpoints(config.checkpoints)
    options = config.models
    threads = max(1, int(options.ray_actor_options.num_cpus))
    handles = {
        name: ModelServer.options(
            name=f"model-{name}",
            num_replicas=options.num_replicas,
            max_ongoing_requests=options.max_ongoing_requests,
            ray_actor_options=options.ray_actor_options.model_dump(),
        ).bind(str(path), config.device, threads, config.engine.model_dump())
        for name, path in models.items()
    }
    gateway = config.gateway
    return Gateway.options(
        num_replicas=gateway.num_replicas,
        max_ongoing_requests=gateway.max_ongoing_requests,
        ray_actor_options=gateway.ray_actor_options.model_dump(),
    ).bind(handles, default_model(models, config), config.limits.model_dump())


def grpc_options(config: ServingConfig) -> gRPCOptions:
    return gRPCOptions(port=config.grpc_port, grpc_servicer_functions=GRPC_SERVICERS)


def start(config: ServingConfig, app_name: str, route_prefix: str) -> None:
    """Starts Serve's proxies on the connected Ray cluster and runs the application."""
    serve.start(
        grpc_options=grpc_options(config),
        http_options={"host": "127.0.0.1", "port": config.http_port},
    )
    serve.run(build_app(config), name=app_name, route_prefix=route_prefix, blocking=False)
