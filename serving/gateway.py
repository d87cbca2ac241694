"""The ingress deployment: implements the gRPC services and forwards each call
through a deployment handle to the model's deployment.

Ray Serve's gRPC proxy routes an RPC to the ingress method of the same name.
Protobuf classes are imported inside the methods, so the deployment never
captures them when it is defined.

Status codes: INVALID_ARGUMENT names the offending field; RESOURCE_EXHAUSTED
when a request can never fit a replica's cache or the model's queue is full;
UNAVAILABLE when the model's replica died under the request (Ray Serve
replaces it; retry); UNAUTHENTICATED without the configured bearer token;
DEADLINE_EXCEEDED and CANCELLED come from the client, and the request's work
stops with them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from engines.scheduler import AdmissionError
from engines.utf8 import Utf8Chunker
from serving.config import AuthConfig, Limits, model_deployment
from serving.metrics import gateway_metrics
from serving.validation import InvalidArgument, generate_params, resolve_model, score_text

SERVICES = ("patchwork.v1.ByteLM", "patchwork.v1.Models")
HEALTH_TIMEOUT_S = 5.0
_UNAVAILABLE = (RayActorError, ActorDiedError, ActorUnavailableError, DeploymentUnavailableError)


class _Abort(Exception):
    """Raised after the status code and details are set on the gRPC context."""


def _abort(context: RayServegRPCContext, code: grpc.StatusCode, details: str):
    context.set_code(code)
    context.set_details(details)
    raise _Abort(details)


@contextmanager
def _model_errors(context: RayServegRPCContext):
    """Maps what a model deployment can raise to gRPC status codes."""
    try:
        yield
    except (AdmissionError, BackPressureError) as e:
        # Errors raised in a model replica arrive wrapped; the original is their cause.
        _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(getattr(e, "cause", None) or e))
    except _UNAVAILABLE as e:
        _abort(context, grpc.StatusCode.UNAVAILABLE, f"the model replica is unavailable ({type(e).__name__}); retry")


def _parse(message_type, raw, context: RayServegRPCContext):
    """The request message from the raw bytes the proxy passes on."""
    if isinstance(raw, message_type):
        return raw
    try:
        return message_type.FromString(raw)
    except DecodeError as e:
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid {message_type.DESCRIPTOR.full_name} ({e})")


def load_token(auth: AuthConfig) -> str | None:
    """The bearer token, from the environment or the token file; None turns auth off."""
    token = os.environ.get(auth.token_env)
    if not token and auth.token_file is not None:
        token = Path(auth.token_file).read_text().strip()
    return token or None


def _usage(result: dict, pb2):
    return pb2.Usage(
        prompt_bytes=result["prompt_bytes"],
        generated_bytes=result["generated_bytes"],
        patches=len(result["patch_lengths"]),
        global_steps=result["global_steps"],
    )


def _finish_reason(result: dict, pb2) -> int:
    return {
        "length": pb2.FINISH_REASON_LENGTH,
        "stop": pb2.FINISH_REASON_STOP,
        "end_of_sequence": pb2.FINISH_REASON_END_OF_SEQUENCE,
    }[result["finish_reason"]]


@serve.deployment
class Gateway:
    def __init__(self, models: dict[str, DeploymentHandle], default_model: str, limits: dict, auth: dict):
        self.models = models
        self.default_model = default_model
        self.limits = Limits(**limits)
        self.token = load_token(AuthConfig(**auth))

    # -- shared pieces ----------------------------------------------------

    @contextmanager
    def _observed(self, method: str, context: RayServegRPCContext):
        """Authorizes the call and records its count and latency by status code."""
        start = time.perf_counter()
        code = "OK"
        try:
            self._authorize(context)
            yield
        except BaseException as e:
            code = context.code().name if isinstance(e, _Abort) and context.code() else (
                "CANCELLED" if isinstance(e, (asyncio.CancelledError, GeneratorExit)) else "INTERNAL"
            )
            raise
        finally:
            recorded = gateway_metrics()
            tags = {"method": method, "code": code}
            recorded["requests"].inc(tags=tags)
            recorded["latency"].observe(time.perf_counter() - start, tags=tags)

    def _authorize(self, context: RayServegRPCContext) -> None:
        if self.token is None:
            return
        supplied = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(supplied.encode(), f"Bearer {self.token}".encode()):
            _abort(context, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong 'authorization: Bearer <token>'")

    def _model(self, name: str, context) -> tuple[str, DeploymentHandle]:
        try:
            model = resolve_model(name, list(self.models), self.default_model)
        except InvalidArgument as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return model, self.models[model]

    def _generate_args(self, request, context):
        try:
            params = generate_params(request, self.limits)
        except InvalidArgument as e:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        model, handle = self._model(request.model, context)
        return model, handle, params.model_dump()

    # -- patchwork.v1.ByteLM ---------------------------------------------

    async def Generate(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import bytelm_pb2 as pb2

        with self._observed("Generate", grpc_context):
            request = _parse(pb2.GenerateRequest, request, grpc_context)
            model, handle, params = self._generate_args(request, grpc_context)
            with _model_errors(grpc_context):
                result = await handle.generate.remote(request.prompt, params)
            return pb2.GenerateResponse(
                text=result["text"],
                finish_reason=_finish_reason(result, pb2),
                patch_lengths=result["patch_lengths"],
                usage=_usage(result, pb2),
                model=model,
            )

    async def GenerateStream(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import bytelm_pb2 as pb2

        with self._observed("GenerateStream", grpc_context):
            request = _parse(pb2.GenerateRequest, request, grpc_context)
            model, handle, params = self._generate_args(request, grpc_context)
            chunker = Utf8Chunker()
            with _model_errors(grpc_context):
                async for item in handle.options(stream=True).generate_stream.remote(request.prompt, params):
                    if "finish_reason" not in item:
                        text = chunker.push(item["text"])
                        if text:
                            yield pb2.GenerateStreamChunk(text=text, model=model)
                        continue
                    yield pb2.GenerateStreamChunk(
                        text=chunker.flush(),
                        finish_reason=_finish_reason(item, pb2),
                        patch_lengths=item["patch_lengths"],
                        usage=_usage(item, pb2),
                        model=model,
                    )

    async def Score(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import bytelm_pb2 as pb2

        with self._observed("Score", grpc_context):
            request = _parse(pb2.ScoreRequest, request, grpc_context)
            try:
                text = score_text(request, self.limits)
            except InvalidArgument as e:
                _abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            model, handle = self._model(request.model, grpc_context)
            with _model_errors(grpc_context):
                result = await handle.score.remote(text)
            return pb2.ScoreResponse(
                entropies=result["entropies"],
                patch_lengths=result["patch_lengths"],
                bits_per_byte=result["bits_per_byte"],
                model=model,
            )

    # -- patchwork.v1.Models ---------------------------------------------

    async def ListModels(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import models_pb2

        with self._observed("ListModels", grpc_context):
            _parse(models_pb2.ListModelsRequest, request, grpc_context)
            names = sorted(self.models)
            with _model_errors(grpc_context):
                described = await asyncio.gather(*(self.models[name].describe.remote() for name in names))
            return models_pb2.ListModelsResponse(models=[
                models_pb2.ModelInfo(
                    name=name,
                    family=info["family"],
                    deployment=model_deployment(name),
                    is_default=name == self.default_model,
                    config_json=json.dumps(info["config"], sort_keys=True),
                    metrics=info["metrics"],
                )
                for name, info in zip(names, described)
            ])

    # -- grpc.health.v1.Health -------------------------------------------

    async def Check(self, request, grpc_context: RayServegRPCContext):
        """Health/Check (no token needed): SERVING when every model deployment answers."""
        from grpc_health.v1 import health_pb2

        if request.service not in ("", *SERVICES):
            _abort(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        try:
            await asyncio.wait_for(
                asyncio.gather(*(handle.describe.remote() for handle in self.models.values())), HEALTH_TIMEOUT_S
            )
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
