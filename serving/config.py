"""Serving configuration: one pydantic model for the whole application."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.scheduler import SchedulerConfig

APP_NAME = "patchwork"
ROUTE_PREFIX = "/patchwork"


class ActorOptions(BaseModel):
    """Ray resources of each replica; fractional GPUs are allowed."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)


class DeploymentOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1)
    max_ongoing_requests: int = Field(default=16, ge=1)
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)


class Limits(BaseModel):
    """Request limits the gateway enforces (INVALID_ARGUMENT past them)."""

    model_config = ConfigDict(extra="forbid")

    max_new_bytes: int = Field(default=4096, ge=1)
    # Taken when a request leaves max_new_bytes at 0.
    default_new_bytes: int = Field(default=256, ge=1)
    max_prompt_bytes: int = Field(default=8192, ge=0)
    max_stop_sequences: int = Field(default=16, ge=0)
    max_stop_bytes: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _default_within_limit(self) -> "Limits":
        if self.default_new_bytes > self.max_new_bytes:
            raise ValueError("default_new_bytes must not exceed max_new_bytes")
        return self


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Every checkpoint directory directly under this one is served, named
    # after its directory.
    checkpoints: Path = Path("checkpoints")
    # Ray Serve's gRPC proxy listens on this port on every interface.
    grpc_port: int = Field(default=9000, ge=1, le=65535)
    # Ray Serve's HTTP proxy (health and routes) on 127.0.0.1.
    http_port: int = Field(default=8000, ge=1, le=65535)
    # Model used when a request names none; None picks the only model, or the
    # first name in sorted order.
    default_model: str | None = None
    # "auto" uses CUDA when the replica was given a GPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    limits: Limits = Field(default_factory=Limits)
    gateway: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(ray_actor_options=ActorOptions(num_cpus=0.0))
    )
    models: DeploymentOptions = Field(default_factory=DeploymentOptions)
    # Continuous batching inside each model replica: slots, bytes per slot,
    # and how many requests may wait for a slot (RESOURCE_EXHAUSTED beyond).
    engine: SchedulerConfig = Field(default_factory=SchedulerConfig)
