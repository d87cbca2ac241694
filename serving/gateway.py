"""The ingress deployment: answers the gRPC services and forwards each call
through a deployment handle to the model's deployment, or, for a model the
gateway runs itself (``ServingConfig.gateway_models``), straight to the
model's server in this process (``serving.local_model``).

Ray Serve's gRPC proxy routes an RPC to the ingress method of the same name.
``gateway_deployment`` builds the ingress class from ``GatewayCore`` (the
shared pieces, ``patchwork.v1.Models`` and health) and the handler mixin of
every service the served families answer (``serving.grpc_services``); a
mixin's methods use ``serving`` (drain, auth, INTERNAL), ``model`` (the
named model's deployment, if its family serves the RPC), ``deadline`` and
``parse``, ``abort`` and ``model_errors`` from here. Protobuf classes are
imported inside the methods, so the deployment never captures them when it is
defined. A refused call ends with its status and an empty response rather than
an exception (``answering_refusals``), so Ray Serve logs no traceback for a
client's mistake.

Status codes: INVALID_ARGUMENT names the offending field (including a request
that can never fit a cache slot, and a model whose family does not serve the
RPC); RESOURCE_EXHAUSTED when the model's queue is
full (retry later); UNAVAILABLE when the model's replica died or cannot serve,
or the server is shutting down (retry, elsewhere); UNAUTHENTICATED without the
configured bearer token, or with more than one; DEADLINE_EXCEEDED and
CANCELLED come from the client, and the request's work stops with them;
INTERNAL says only "internal error" and the request id, whose traceback is in
the gateway's log.

Health (grpc.health.v1.Health/Check) answers from the model deployments'
replica states, which the gateway reads from Ray Serve's controller in the
background once a second, and from the scheduler heartbeat of each model it
runs itself; a check never waits on the controller and never calls a model:
SERVING when every model deployment has a running replica, every model here
can serve, and the gateway is not draining. A model replica whose scheduler stops or stalls fails
Ray Serve's own health check (``ModelServer.check_health``), leaves the running
state and is replaced.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from patchwork.engines.api import AdmissionError, DeadlineExceeded, EngineUnavailable, InvalidRequest, RequestCancelled
from patchwork.serving.config import APP_NAME, GATEWAY, AuthConfig, Limits, model_deployment
from patchwork.serving.edge import DEADLINE_KEY
from patchwork.serving.grpc_services import GrpcService
from patchwork.serving.local_model import LocalModel, start_local_model
from patchwork.serving.validation import InvalidArgument, resolve_model

logger = logging.getLogger("ray.serve")

HEALTH_REFRESH_S = 1.0
HEALTH_STALE_S = 60.0
_UNAVAILABLE = (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError, EngineUnavailable)


class _Abort(Exception):
    """Raised after the status code and details are set on the gRPC context."""


def abort(context: RayServegRPCContext, code: grpc.StatusCode, details: str):
    context.set_code(code)
    context.set_details(details)
    raise _Abort(details)


def _original(error: BaseException) -> BaseException:
    """Errors raised in a model replica arrive wrapped; the original is their cause."""
    return getattr(error, "cause", None) or error


@contextmanager
def model_errors(context: RayServegRPCContext):
    """Maps what a model deployment can raise to gRPC status codes."""
    try:
        yield
    except InvalidRequest as e:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(_original(e)))
    except (AdmissionError, BackPressureError) as e:
        abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(_original(e)))
    except DeadlineExceeded:
        abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
    except RequestCancelled:
        abort(context, grpc.StatusCode.CANCELLED, "the request was cancelled")
    except _UNAVAILABLE as e:
        cause = _original(e)
        reason = str(cause) if isinstance(cause, EngineUnavailable) else f"the model replica is unavailable ({type(cause).__name__})"
        abort(context, grpc.StatusCode.UNAVAILABLE, f"{reason}; retry")


def parse(message_type, raw, context: RayServegRPCContext):
    """The request message from the raw bytes the proxy passes on."""
    if isinstance(raw, message_type):
        return raw
    try:
        return message_type.FromString(raw)
    except DecodeError as e:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {message_type.DESCRIPTOR.full_name} ({e})")


def load_token(auth: AuthConfig) -> str | None:
    """The bearer token, from the environment or the token file; None turns auth off."""
    token = os.environ.get(auth.token_env)
    if not token and auth.token_file is not None:
        token = Path(auth.token_file).read_text().strip()
    return token or None


class ModelHealth:
    """Whether every model deployment has a running replica, as Ray Serve's
    controller sees it, and every model this replica runs itself can serve
    (its scheduler's heartbeat, ``ModelServer.problem``). A task on the
    gateway's event loop reads the controller every ``HEALTH_REFRESH_S``; a
    check answers from the last reading and never waits on the controller,
    however busy it is. Before the first reading, or when the last one is
    older than ``HEALTH_STALE_S`` (the controller stopped answering), the
    answer is not serving.

    Made on a running event loop (Ray Serve runs a replica's constructor on
    its event loop). The readings run on a thread of their own until ``stop``
    (the replica is stopping), after which nothing is read or logged. With
    no model deployment to watch (every model runs here) nothing is read:
    a reading costs the replica a controller call and its (un)pickling, which
    would compete with the requests for the interpreter."""

    def __init__(self, deployments: list[str], local: list | None = None):
        self.deployments = deployments
        self.local = local or []
        self.serving = False
        self.read_at = float("-inf")
        self.stopped = False
        self._loop = asyncio.get_running_loop()
        self._reads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health") if deployments else None
        self._reader = self._loop.create_task(self._read_forever()) if deployments else None

    def current(self) -> bool:
        fresh = not self.deployments or (self.serving and time.monotonic() - self.read_at < HEALTH_STALE_S)
        return fresh and all(server.problem() is None for server in self.local)

    def stop(self) -> None:
        """Ends the readings; callable from any thread, more than once."""
        self.stopped = True
        if self._reader is None:
            return
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._reader.cancel)
        self._reads.shutdown(wait=False, cancel_futures=True)

    async def _read_forever(self) -> None:
        while not self.stopped:
            try:
                status = await self._loop.run_in_executor(self._reads, serve.status)
                self.serving = self._all_running(status)
            except Exception:
                if self.stopped:  # the replica is stopping: what failed was the reading's end
                    return
                logger.warning("reading the deployments' status failed", exc_info=True)
                self.serving = False
            self.read_at = time.monotonic()
            await asyncio.sleep(HEALTH_REFRESH_S)

    def _all_running(self, status) -> bool:
        application = status.applications.get(APP_NAME)
        if application is None:
            return False
        for name in self.deployments:
            deployment = application.deployments.get(name)
            states = {str(getattr(k, "value", k)): v for k, v in (deployment.replica_states if deployment else {}).items()}
            if states.get("RUNNING", 0) < 1:
                return False
        return True


@dataclass(frozen=True)
class ServedModel:
    """What the gateway knows of a model: its family and the RPCs that family serves."""

    family: str
    rpcs: list[str]


class GatewayCore:
    """What every service's handlers share, the ``patchwork.v1.Models``
    service and health. ``services`` are the names Health/Check knows."""

    services: tuple[str, ...] = ("patchwork.v1.Models",)

    def __init__(self, models: dict[str, DeploymentHandle], served: dict[str, ServedModel], default_model: str,
                 limits: dict, auth: dict, local: dict[str, dict] | None = None):
        self.local = {name: start_local_model(spec) for name, spec in (local or {}).items()}
        self.models: dict[str, DeploymentHandle | LocalModel] = {**models, **self.local}
        self.served = served
        self.default_model = default_model
        self.limits = Limits(**limits)
        self.token = load_token(AuthConfig(**auth))
        self.health = ModelHealth([model_deployment(name) for name in models],
                                  [model.server for model in self.local.values()])
        self.draining_until: float | None = None

    async def reconfigure(self, config: dict) -> None:
        """Ray Serve's user_config: ``draining_until`` (a Unix time) starts a
        drain, here and in the models this replica runs itself."""
        self.draining_until = config.get("draining_until")
        for model in self.local.values():
            await model.server.reconfigure(config)

    def __del__(self) -> None:
        """Ray Serve calls this when it stops the replica: the health readings
        end and the models run here close their engines."""
        health = getattr(self, "health", None)  # absent when the constructor failed
        if health is not None:
            health.stop()
        for model in getattr(self, "local", {}).values():
            model.server.close()

    def check_health(self) -> None:
        """Ray Serve's replica check: fails when a model this replica runs
        itself cannot serve (Ray Serve then replaces the replica)."""
        for model in self.local.values():
            model.server.check_health()

    def placement(self) -> dict[str, list[str]]:
        """Which models each deployment runs: this gateway's own, and each
        model deployment's one (``patchwork serve status`` shows it)."""
        return {GATEWAY: sorted(self.local), **{model_deployment(name): [name] for name in sorted(self.models)
                                                if name not in self.local}}

    def model_stats(self, name: str) -> dict:
        """The engine stats of a model this replica runs itself (what a model
        deployment's ``stats`` gives), for operators and tests."""
        return self.local[name].server.stats()

    # -- for every service's handlers --------------------------------------

    @contextmanager
    def serving(self, context: RayServegRPCContext):
        """Refuses calls while draining, authorizes, and turns anything
        unexpected into INTERNAL with the request id (the traceback is logged)."""
        try:
            if self.draining_until is not None:
                abort(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry elsewhere")
            self._authorize(context)
            yield
        except (_Abort, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            request_id = context.request_id() or "-"
            logger.exception("request %s failed", request_id)
            abort(context, grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})")

    def _authorize(self, context: RayServegRPCContext) -> None:
        if self.token is None:
            return
        supplied = [value for key, value in context.invocation_metadata() if key == "authorization"]
        if len(supplied) > 1:
            abort(context, grpc.StatusCode.UNAUTHENTICATED, "send one 'authorization' header, not several")
        given = supplied[0] if supplied else ""
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong 'authorization: Bearer <token>'")

    def model(self, name: str, rpc: str, context) -> tuple[str, DeploymentHandle]:
        """The model a request names and its deployment, if its family serves
        ``rpc``. A request that names none goes to the default model, or, if
        its family does not serve ``rpc``, to the first model (by name) whose does."""
        if not name and rpc not in self.served[self.default_model].rpcs:
            name = next((m for m in sorted(self.served) if rpc in self.served[m].rpcs), "")
        try:
            model = resolve_model(name, list(self.models), self.default_model)
        except InvalidArgument as e:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        served = self.served[model]
        if rpc not in served.rpcs:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"model: {model!r} (family {served.family}) does not serve {rpc}; it serves "
                  f"{', '.join(served.rpcs) or 'nothing yet'}")
        return model, self.models[model]

    @staticmethod
    def deadline(context: RayServegRPCContext) -> float | None:
        """The client's deadline (a Unix time) the edge passed on, if any."""
        for key, value in context.invocation_metadata():
            if key == DEADLINE_KEY:
                try:
                    return float(value)
                except ValueError:
                    return None
        return None

    # -- patchwork.v1.Models ---------------------------------------------

    async def ListModels(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import models_pb2

        with self.serving(grpc_context):
            parse(models_pb2.ListModelsRequest, request, grpc_context)
            names = sorted(self.models)
            with model_errors(grpc_context):
                described = await asyncio.gather(*(self.models[name].describe.remote() for name in names))
            return models_pb2.ListModelsResponse(models=[
                models_pb2.ModelInfo(
                    name=name,
                    family=info.family,
                    deployment=GATEWAY if name in self.local else model_deployment(name),
                    is_default=name == self.default_model,
                    config_json=json.dumps(info.config, sort_keys=True),
                    metrics=info.metrics,
                    defaults_json=json.dumps(info.defaults, sort_keys=True),
                )
                for name, info in zip(names, described)
            ])

    # -- grpc.health.v1.Health -------------------------------------------

    async def Check(self, request, grpc_context: RayServegRPCContext):
        """Health/Check (no token needed): SERVING when every model deployment
        has a running replica and the server is not draining."""
        from grpc_health.v1 import health_pb2

        if request.service not in ("", *self.services):
            abort(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        serving = self.draining_until is None and self.health.current()
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)


# The RPCs GatewayCore answers itself, by service.
CORE_RPCS = {"patchwork.v1.Models": ("ListModels",), "grpc.health.v1.Health": ("Check",)}


def gateway_deployment(services: list[GrpcService]):
    """The ingress deployment answering ``services`` besides Models and health."""
    handlers = tuple(service.handlers for service in services)
    names = GatewayCore.services + tuple(service.name for service in services)
    gateway = type("Gateway", (*handlers, GatewayCore), {"services": names})
    rpcs = {**CORE_RPCS, **{service.name: tuple(sorted(service.rpcs)) for service in services}}
    for service, methods in rpcs.items():
        for method in methods:
            setattr(gateway, method, answering_refusals(getattr(gateway, method), service, method))
    return serve.deployment(gateway)


def answering_refusals(handler, service: str, method: str):
    """``handler`` with a refused call (``abort``: its code and details
    already on the context) ending as a normal return, an empty response or
    the end of a stream, which carries that status to the client: Ray Serve
    logs a traceback for whatever a replica's method raises, and a client's
    bad request is no server error. (INTERNAL's traceback is logged by
    ``GatewayCore.serving``, under the request id.)"""
    if inspect.isasyncgenfunction(handler):
        async def stream(self, request, grpc_context):
            try:
                async for item in handler(self, request, grpc_context):
                    yield item
            except _Abort:
                return

        return functools.wraps(handler)(stream)

    async def unary(self, request, grpc_context):
        try:
            return await handler(self, request, grpc_context)
        except _Abort:
            response = empty_response(service, method)
            if response is None:  # a service without a protobuf descriptor: refused as before, by raising
                raise
            return response

    return functools.wraps(handler)(unary)


def empty_response(service: str, method: str):
    """An empty message of ``service``'s ``method``'s response type (its
    module is imported by then: every handler imports its messages first),
    or None when no protobuf descriptor describes the service."""
    from google.protobuf import descriptor_pool, message_factory

    try:
        output = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(method).output_type
    except KeyError:
        return None
    return message_factory.GetMessageClass(output)()
