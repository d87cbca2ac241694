"""Serving configuration: one pydantic model for the whole application.

``serving.deploy`` turns it into the Ray Serve config file that Ray's own
``serve run`` / ``serve deploy`` accept; ``python -m serving up`` deploys the
same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engines.scheduler import SchedulerConfig

APP_NAME = "patchwork"
ROUTE_PREFIX = "/patchwork"
GATEWAY = "gateway"


def model_deployment(model: str) -> str:
    """The Ray Serve deployment that serves ``model``."""
    return f"model-{model}"


class ActorOptions(BaseModel):
    """Ray resources of each replica; fractional GPUs are allowed."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)


class AutoscalingConfig(BaseModel):
    """Ray Serve autoscaling: replicas follow the ongoing requests per replica."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=8.0, gt=0)
    upscale_delay_s: float = Field(default=5.0, ge=0)
    downscale_delay_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class DeploymentOptions(BaseModel):
    """One deployment's replicas and admission: a fixed ``num_replicas`` or an
    ``autoscaling_config``; ``max_ongoing_requests`` per replica, and beyond it
    up to ``max_queued_requests`` waiting per caller (-1: no bound) before
    RESOURCE_EXHAUSTED."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(default=1, ge=1)
    autoscaling_config: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(default=16, ge=1)
    max_queued_requests: int = Field(default=64, ge=-1)
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)

    @model_validator(mode="after")
    def _one_way_to_scale(self) -> "DeploymentOptions":
        if self.autoscaling_config is not None:
            self.num_replicas = None
        elif self.num_replicas is None:
            raise ValueError("set num_replicas or autoscaling_config")
        return self


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


class AuthConfig(BaseModel):
    """Optional bearer-token auth: when a token is found, every RPC but the
    health check needs ``authorization: Bearer <token>`` metadata
    (UNAUTHENTICATED otherwise). The gateway reads the token, at start, from
    the environment variable ``token_env`` of its process or from ``token_file``."""

    model_config = ConfigDict(extra="forbid")

    token_env: str = "PATCHWORK_AUTH_TOKEN"
    token_file: Path | None = None


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Every checkpoint directory directly under this one is served, named
    # after its directory.
    checkpoints: Path = Path("checkpoints")
    # Ray Serve's gRPC proxy listens on this port on every interface.
    grpc_port: int = Field(default=9000, ge=1, le=65535)
    # Ray Serve's HTTP proxy (health and routes) on 127.0.0.1.
    http_port: int = Field(default=8000, ge=1, le=65535)
    # Prometheus metrics of the whole Ray cluster (Ray Serve's and Patchwork's),
    # at http://127.0.0.1:<metrics_port>/metrics; set when `serving up` starts Ray.
    metrics_port: int = Field(default=8088, ge=1, le=65535)
    # Server-side limit on one request, end to end (None: only client deadlines).
    request_timeout_s: float | None = Field(default=None, gt=0)
    # Model used when a request names none; None picks the first name in sorted order.
    default_model: str | None = None
    # "auto" uses CUDA (and bfloat16) when the replica was given a GPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    limits: Limits = Field(default_factory=Limits)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    gateway: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(
            max_ongoing_requests=256, max_queued_requests=-1, ray_actor_options=ActorOptions(num_cpus=0.0)
        )
    )
    # Options of every model deployment, unless `model_overrides` names the model.
    models: DeploymentOptions = Field(default_factory=DeploymentOptions)
    model_overrides: dict[str, DeploymentOptions] = Field(default_factory=dict)
    # Continuous batching inside each model replica: slots, bytes per slot,
    # and how many requests may wait for a slot (RESOURCE_EXHAUSTED beyond).
    engine: SchedulerConfig = Field(default_factory=SchedulerConfig)

    def options_for(self, model: str) -> DeploymentOptions:
        return self.model_overrides.get(model, self.models)
