"""Builds the Ray Serve application: one gateway plus one deployment per model.

Every checkpoint directory directly under ``ServingConfig.checkpoints`` is a
model, named after its directory, served by its own deployment
(``model-<name>``) of its family's deployment class, with the replicas and
resources of ``ServingConfig.models`` (or of ``model_overrides[name]``),
unless the gateway runs it itself (``ServingConfig.gateway_models``; by
default the model when only one is served, and of several each that can
share the gateway's one replica: ``ServingConfig.shares_gateway``): then the
gateway's replicas load it and answer its RPCs with no hop. The gateway answers the services of
every known family. ``build`` is the
application builder that Ray Serve config files name
(``import_path: serving.app:build``).
"""

from __future__ import annotations

import re
from pathlib import Path

from ray import serve

from patchwork.engines.checkpoint import CONFIG_FILE, CheckpointError, read_header, read_manifest
from patchwork.engines.registry import get_family, register
from patchwork.serving.config import GATEWAY, ServingConfig, model_deployment
from patchwork.serving.deploy import deployment_entry
from patchwork.serving.families import served_family
from patchwork.serving.gateway import ServedModel, gateway_deployment
from patchwork.serving.grpc_services import known_services, load_object

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def discover_checkpoints(root: Path, families: dict[str, str] | None = None) -> dict[str, Path]:
    """Model name -> checkpoint directory, for every valid checkpoint under ``root``
    (``root`` itself may be a checkpoint) of a known family or of one of
    ``families`` (``ServingConfig.families``). Raises CheckpointError when a
    directory that looks like a checkpoint is broken, or when there is none."""
    register(families or {})
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
            f"`patchwork train blt --preset default --out {root / 'blt-default'}`"
        )
    return models


def default_model(models: dict[str, Path], config: ServingConfig) -> str:
    if config.default_model is not None:
        if config.default_model not in models:
            raise CheckpointError(f"default model {config.default_model!r} is not among {sorted(models)}")
        return config.default_model
    return sorted(models)[0]


def model_args(config: ServingConfig, name: str, path: Path) -> list:
    """What a model's server is built with: checkpoint, device, threads, engine settings, families."""
    threads = max(1, int(config.options_for(name).ray_actor_options.num_cpus))
    return [str(path), config.device, threads, config.engine_for(name).model_dump(), config.families]


def build_app(config: ServingConfig):
    models = discover_checkpoints(config.checkpoints, config.families)
    in_gateway = config.in_gateway(list(models))
    handles, served, local = {}, {}, {}
    for name, path in models.items():
        family = read_header(path)[0].family
        serving = served_family(family)
        served[name] = ServedModel(family=family, rpcs=sorted(serving.rpcs))
        if name in in_gateway:
            local[name] = {"deployment": serving.deployment, "args": model_args(config, name, path)}
            continue
        entry = deployment_entry(model_deployment(name), config.options_for(name), config.drain_grace_s)
        handles[name] = serve.deployment(load_object(serving.deployment)).options(**entry).bind(
            *model_args(config, name, path))
    gateway = gateway_deployment(known_services())
    entry = deployment_entry(GATEWAY, config.gateway_for(list(models)), config.drain_grace_s)
    return gateway.options(**entry).bind(
        handles, served, default_model(models, config), config.limits.model_dump(),
        config.auth.model_dump(mode="json"), local,
    )


def build(args: dict):
    """Application builder for Ray Serve config files: ``args = {"config": ServingConfig}``.
    Replica counts, autoscaling and admission bounds come from the file's
    ``deployments`` entries."""
    return build_app(ServingConfig.model_validate(args.get("config", {})))
