"""The ingress deployment: implements the gRPC services and forwards each call
through a deployment handle to the model's deployment.

Ray Serve's gRPC proxy routes an RPC to the ingress method of the same name.
Protobuf classes are imported inside the methods, so the deployment never
captures them when it is defined.
"""

from __future__ import annotations

import asyncio

import grpc
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from engines.scheduler import AdmissionError
from engines.utf8 import Utf8Chunker
from serving.config import Limits
from serving.validation import InvalidArgument, generate_params, resolve_model, score_text

SERVICE = "patchwork.v1.ByteLM"
HEALTH_TIMEOUT_S = 5.0


class _Abort(Exception):
    """Raised after the status code and details are set on the gRPC context."""


def _abort(context: RayServegRPCContext, code: grpc.StatusCode, details: str):
    context.set_code(code)
    context.set_details(details)
    raise _Abort(details)


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


async def _prepend(first, rest):
    yield first
    async for item in rest:
        yield item


@serve.deployment(name="gateway")
class Gateway:
    def __init__(self, models: dict[str, DeploymentHandle], default_model: str, limits: dict):
        self.models = models
        self.default_model = default_model
        self.limits = Limits(**limits)

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

    async def Generate(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import bytelm_pb2 as pb2

        model, handle, params = self._generate_args(request, grpc_context)
        try:
            result = await handle.generate.remote(request.prompt, params)
        except AdmissionError as e:
            _abort(grpc_context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        return pb2.GenerateResponse(
            text=result["text"],
            finish_reason=_finish_reason(result, pb2),
            patch_lengths=result["patch_lengths"],
            usage=_usage(result, pb2),
            model=model,
        )

    async def GenerateStream(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import bytelm_pb2 as pb2

        model, handle, params = self._generate_args(request, grpc_context)
        chunker = Utf8Chunker()
        items = handle.options(stream=True).generate_stream.remote(request.prompt, params)
        try:
            first = await items.__anext__()
        except AdmissionError as e:
            _abort(grpc_context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        async for item in _prepend(first, items):
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

        try:
            text = score_text(request, self.limits)
        except InvalidArgument as e:
            _abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        model, handle = self._model(request.model, grpc_context)
        result = await handle.score.remote(text)
        return pb2.ScoreResponse(
            entropies=result["entropies"],
            patch_lengths=result["patch_lengths"],
            bits_per_byte=result["bits_per_byte"],
            model=model,
        )

    async def Check(self, request, grpc_context: RayServegRPCContext):
        """grpc.health.v1.Health/Check: SERVING when every model deployment answers."""
        from grpc_health.v1 import health_pb2

        if request.service not in ("", SERVICE):
            _abort(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        try:
            await asyncio.wait_for(
                asyncio.gather(*(handle.describe.remote() for handle in self.models.values())), HEALTH_TIMEOUT_S
            )
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)
