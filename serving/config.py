"""Serving configuration: one pydantic model for the whole application.

``serving.deploy`` turns it into the Ray Serve config file that Ray's own
``serve run`` / ``serve deploy`` accept; ``patchwork serve up`` deploys the
same file.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from patchwork.engines.scheduler import SchedulerConfig

APP_NAME = "patchwork"
ROUTE_PREFIX = "/patchwork"
GATEWAY = "gateway"
# Ports above `direct_grpc_port` that gateway replicas may take.
DIRECT_PORTS = 64


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
    # How often the callers report their ongoing requests, and over how long a
    # window the autoscaler averages them (Ray Serve's defaults): shorter ones
    # follow a burst sooner and take a lull for the end of the load sooner.
    metrics_interval_s: float = Field(default=10.0, gt=0)
    look_back_period_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class DeploymentOptions(BaseModel):
    """One deployment's replicas and admission: a fixed ``num_replicas`` or an
    ``autoscaling_config``; ``max_ongoing_requests`` per replica, and beyond it
    up to ``max_queued_requests`` waiting per caller (-1: no bound) before
    RESOURCE_EXHAUSTED. Ray Serve calls each replica's health check every
    ``health_check_period_s`` and replaces a replica that keeps failing it."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int | None = Field(default=1, ge=1)
    autoscaling_config: AutoscalingConfig | None = None
    max_ongoing_requests: int = Field(default=16, ge=1)
    max_queued_requests: int = Field(default=64, ge=-1)
    health_check_period_s: float = Field(default=5.0, gt=0)
    # A replica that does not answer within this (three times in a row) is
    # replaced; shorter catches a frozen replica sooner but can replace one
    # that is merely slow on an overloaded machine.
    health_check_timeout_s: float = Field(default=30.0, gt=0)
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
    # With the default new bytes it fills the engine's default 8192-byte slot.
    max_prompt_bytes: int = Field(default=7936, ge=0)
    max_stop_sequences: int = Field(default=16, ge=0)
    max_stop_bytes: int = Field(default=64, ge=1)
    # Images per GenerateImage request.
    max_samples: int = Field(default=8, ge=1)
    # An uploaded image (PNG or JPEG): its file size, and its width and height
    # (checked from the header, before any pixel is decoded).
    max_image_bytes: int = Field(default=512 * 1024, ge=1)
    max_image_side: int = Field(default=1024, ge=1)
    # An audio-video clip: the bytes of its sound and frames together, its
    # audio's duration (checked before resampling), its frame count and the
    # pixels of its decoded frames.
    max_clip_bytes: int = Field(default=768 * 1024, ge=1)
    max_audio_seconds: float = Field(default=30.0, gt=0)
    max_frames: int = Field(default=64, ge=1)
    # The pixels of a clip's decoded frames together (64 frames of 256 x 256).
    max_clip_pixels: int = Field(default=64 * 256 * 256, ge=1)
    # Labels or matches one Classify or Retrieve returns.
    max_top_k: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _default_within_limit(self) -> "Limits":
        if self.default_new_bytes > self.max_new_bytes:
            raise ValueError("default_new_bytes must not exceed max_new_bytes")
        return self

    @property
    def max_message_bytes(self) -> int:
        """The largest gRPC message a call within these limits needs, either
        way: a request with the longest prompt and every stop sequence, a
        Score response (a float and a patch length per byte), a generation
        (text and patch lengths), an uploaded image with its texts, an
        audio-video clip, with room for the small fields and a model
        listing. The gRPC proxy refuses larger messages before they reach
        Patchwork."""
        request = self.max_prompt_bytes + self.max_stop_sequences * (self.max_stop_bytes + 4)
        images = self.max_image_bytes + 2 * self.max_prompt_bytes
        clips = self.max_clip_bytes + 8 * self.max_frames
        return max(request, images, clips, 8 * self.max_prompt_bytes, 4 * self.max_new_bytes) + 64 * 1024


class AuthConfig(BaseModel):
    """Optional bearer-token auth: when a token is found, every RPC but the
    health check needs ``authorization: Bearer <token>`` metadata
    (UNAUTHENTICATED otherwise). The gateway reads the token, at start, from
    the environment variable ``token_env`` of its process or from ``token_file``."""

    model_config = ConfigDict(extra="forbid")

    token_env: str = "PATCHWORK_AUTH_TOKEN"
    token_file: Path | None = None


class ClientTls(BaseModel):
    """TLS for clients, terminated by NGINX in front of the public gRPC port
    (``serving.tls_front``); clients verify ``cert`` with the CA that signed it."""

    model_config = ConfigDict(extra="forbid")

    cert: Path  # PEM: the server's certificate (chain)
    key: Path  # PEM: its private key
    port: int = Field(default=9443, ge=1, le=65535)


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Every checkpoint directory directly under this one is served, named
    # after its directory.
    checkpoints: Path = Path("checkpoints")
    # Model families defined outside Patchwork: family name -> the module that
    # defines its FAMILY (engines.registry), importable in every replica.
    families: dict[str, str] = Field(default_factory=dict)
    # The address the public gRPC ports (`grpc_port`, `direct_grpc_port`)
    # listen on: loopback unless an operator opens them, "0.0.0.0" or "::" to
    # every interface or a host's own address to one (docs/security.md). With
    # `tls` it is where the TLS port listens, and the plaintext ports stay on loopback.
    host: str = "127.0.0.1"
    tls: ClientTls | None = None
    # Ray Serve's gRPC proxy listens on this port.
    grpc_port: int = Field(default=9000, ge=1, le=65535)
    # How clients reach the gateway. "direct" (Ray Serve's direct ingress):
    # each gateway replica also answers gRPC itself, the first one on
    # `direct_grpc_port` and any others on the next free ports up to
    # DIRECT_PORTS above it: one Ray hop less than through the proxy.
    # The proxy keeps answering on `grpc_port` either way. "proxy": only the proxy.
    ingress: Literal["direct", "proxy"] = "direct"
    direct_grpc_port: int = Field(default=9010, ge=1, le=65535 - DIRECT_PORTS)
    # Ray Serve's HTTP proxy (health and routes) on 127.0.0.1.
    http_port: int = Field(default=8000, ge=1, le=65535)
    # Prometheus metrics of the whole Ray cluster (Ray Serve's and Patchwork's),
    # at http://<metrics_host>:<metrics_port>/metrics; set when `serving up`
    # starts Ray. "127.0.0.1" keeps them on loopback (the local cluster's node
    # address is loopback then); any other value lets Ray listen on every interface.
    metrics_port: int = Field(default=8088, ge=1, le=65535)
    metrics_host: Literal["127.0.0.1", "0.0.0.0"] = "127.0.0.1"
    # How long requests in flight may finish when replicas stop: for `serving
    # down` (new requests are refused with UNAVAILABLE from the start; what is
    # still running at the end ends with UNAVAILABLE, so clients can retry
    # elsewhere), and for a replica that scaling down removes (Ray Serve's
    # graceful_shutdown_timeout_s is this plus a margin).
    drain_grace_s: float = Field(default=30.0, ge=0)
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
    # Models the gateway's replicas run themselves, with no hop to a model
    # deployment. "auto": the model, when only one is served; of several,
    # every model that can share the gateway's replica as it is
    # (`shares_gateway`: no `model_overrides` entry, and `models` asks for one
    # fixed replica and no GPU), while one that is scaled on its own
    # (replicas, autoscaling) or asks for resources of its own keeps its own
    # deployment. A model run in the gateway has no deployment: it scales
    # with the gateway, whose replicas take its Ray resources on top of their
    # own, and Ray Serve's bounds on the gateway are its bounds (its engine's
    # queue still refuses with RESOURCE_EXHAUSTED past its own bound).
    gateway_models: list[str] | Literal["auto"] = "auto"
    # Options of every model deployment, unless `model_overrides` names the model.
    models: DeploymentOptions = Field(default_factory=DeploymentOptions)
    model_overrides: dict[str, DeploymentOptions] = Field(default_factory=dict)
    # Continuous batching inside each model replica: slots, bytes per slot,
    # the prefill budget, and how many requests may wait for a slot
    # (RESOURCE_EXHAUSTED beyond); `engine_overrides` per model name.
    engine: SchedulerConfig = Field(default_factory=SchedulerConfig)
    engine_overrides: dict[str, SchedulerConfig] = Field(default_factory=dict)

    @field_validator("host")
    @classmethod
    def _an_address(cls, host: str) -> str:
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"an IP address to listen on (127.0.0.1, 0.0.0.0, ::, ...), not {host!r}") from None

    def plaintext_host(self) -> str:
        """Where the plaintext public ports listen: ``host``, or loopback behind TLS."""
        return "127.0.0.1" if self.tls else self.host

    def client_host(self) -> str:
        """The address a client on this machine reaches the plaintext public ports at."""
        host = ipaddress.ip_address(self.plaintext_host())
        if host.is_unspecified:
            return "::1" if host.version == 6 else "127.0.0.1"
        return str(host)

    @model_validator(mode="after")
    def _limits_fit_every_engine(self) -> "ServingConfig":
        engines = {"engine": self.engine, **{f"engine_overrides[{name}]": e for name, e in self.engine_overrides.items()}}
        for where, engine in engines.items():
            slot = engine.max_sequence_bytes
            if self.limits.max_prompt_bytes + self.limits.default_new_bytes > slot:
                raise ValueError(
                    f"limits.max_prompt_bytes ({self.limits.max_prompt_bytes}) plus limits.default_new_bytes "
                    f"({self.limits.default_new_bytes}) exceeds {where}.max_sequence_bytes ({slot}): a request at "
                    "the advertised prompt limit could never be served"
                )
            if self.limits.max_new_bytes > slot:
                raise ValueError(
                    f"limits.max_new_bytes ({self.limits.max_new_bytes}) exceeds {where}.max_sequence_bytes ({slot})"
                )
        return self

    def options_for(self, model: str) -> DeploymentOptions:
        return self.model_overrides.get(model, self.models)

    def engine_for(self, model: str) -> SchedulerConfig:
        return self.engine_overrides.get(model, self.engine)

    def shares_gateway(self, model: str) -> bool:
        """Whether ``auto`` runs ``model`` in the gateway's replicas: it has no
        options of its own and the shared ones ask for one fixed replica on
        the CPU, so the gateway's one replica can hold it."""
        shared = self.models
        return (model not in self.model_overrides and shared.autoscaling_config is None
                and shared.num_replicas == 1 and shared.ray_actor_options.num_gpus == 0)

    def in_gateway(self, models: list[str]) -> list[str]:
        """Which of the served ``models`` the gateway runs itself."""
        if self.gateway_models == "auto":
            return sorted(models if len(models) == 1 else [model for model in models if self.shares_gateway(model)])
        unknown = sorted(set(self.gateway_models) - set(models))
        if unknown:
            raise ValueError(f"gateway_models names {unknown}, which are not among the served models {sorted(models)}")
        return sorted(self.gateway_models)

    def gateway_for(self, models: list[str]) -> DeploymentOptions:
        """The gateway's options when it serves ``models``: its own, except
        that the models it runs itself lend it their scaling (a fixed
        ``num_replicas`` or an ``autoscaling_config``, which must agree
        between them) and add their Ray resources to each replica's."""
        local = [self.options_for(model) for model in self.in_gateway(models)]
        if not local:
            return self.gateway
        if any((o.num_replicas, o.autoscaling_config) != (local[0].num_replicas, local[0].autoscaling_config)
               for o in local):
            raise ValueError(f"the models the gateway runs ({self.in_gateway(models)}) must scale alike; "
                             "give them the same num_replicas or autoscaling_config")
        own = self.gateway.ray_actor_options
        resources = ActorOptions(num_cpus=own.num_cpus + sum(o.ray_actor_options.num_cpus for o in local),
                                 num_gpus=own.num_gpus + sum(o.ray_actor_options.num_gpus for o in local))
        return self.gateway.model_copy(update={"ray_actor_options": resources, "num_replicas": local[0].num_replicas,
                                               "autoscaling_config": local[0].autoscaling_config})
