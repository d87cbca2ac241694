"""The ``patchwork.v1.ByteLM`` service: generation and scoring over raw bytes.

Every generating family answers its ``Generate`` and ``GenerateStream``
(``engines.registry.GENERATION_RPCS``); families whose engines score text
(BLT) answer ``Score`` too. A family's patches and global steps fill
``patch_lengths`` and ``usage`` when its ``Generation.details`` keeps
``engines.api.PatchedOutput``; other families leave them empty.
"""

from __future__ import annotations

import grpc
from ray.serve.grpc_util import RayServegRPCContext

from patchwork.engines.api import FinishReason, Generation, PatchedOutput
from patchwork.engines.utf8 import Utf8Chunker
from patchwork.serving.gateway import abort, model_errors, parse
from patchwork.serving.grpc_services import GrpcService
from patchwork.serving.validation import InvalidArgument, generate_params, score_text


def _patch_lengths(result: Generation) -> list[int]:
    return list(result.details.patch_lengths) if isinstance(result.details, PatchedOutput) else []


def _usage(result: Generation, pb2):
    return pb2.Usage(
        prompt_bytes=result.usage.prompt_tokens,
        generated_bytes=result.usage.generated_tokens,
        patches=len(_patch_lengths(result)),
        global_steps=result.details.global_steps if isinstance(result.details, PatchedOutput) else 0,
    )


def _finish_reason(result: Generation, pb2) -> int:
    return {
        FinishReason.LENGTH: pb2.FINISH_REASON_LENGTH,
        FinishReason.STOP: pb2.FINISH_REASON_STOP,
        FinishReason.END_OF_SEQUENCE: pb2.FINISH_REASON_END_OF_SEQUENCE,
    }[result.finish_reason]


class ByteLMHandlers:
    """The gateway's ByteLM methods (mixed into ``serving.gateway.GatewayCore``)."""

    def _generate_args(self, request, rpc: str, context):
        try:
            params = generate_params(request, self.limits)
        except InvalidArgument as e:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        model, handle = self.model(request.model, rpc, context)
        return model, handle, params

    async def Generate(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import bytelm_pb2 as pb2

        with self.serving(grpc_context):
            request = parse(pb2.GenerateRequest, request, grpc_context)
            model, handle, params = self._generate_args(request, "Generate", grpc_context)
            with model_errors(grpc_context):
                result = await handle.generate.remote(request.prompt, params, self.deadline(grpc_context))
            return pb2.GenerateResponse(
                text=result.text,
                finish_reason=_finish_reason(result, pb2),
                patch_lengths=_patch_lengths(result),
                usage=_usage(result, pb2),
                model=model,
            )

    async def GenerateStream(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import bytelm_pb2 as pb2

        with self.serving(grpc_context):
            request = parse(pb2.GenerateRequest, request, grpc_context)
            model, handle, params = self._generate_args(request, "GenerateStream", grpc_context)
            chunker = Utf8Chunker()
            deadline = self.deadline(grpc_context)
            with model_errors(grpc_context):
                async for item in handle.options(stream=True).generate_stream.remote(request.prompt, params, deadline):
                    if not isinstance(item, Generation):  # output bytes; the Generation ends the stream
                        text = chunker.push(item)
                        if text:
                            yield pb2.GenerateStreamChunk(text=text, model=model)
                        continue
                    yield pb2.GenerateStreamChunk(
                        text=chunker.flush(),
                        finish_reason=_finish_reason(item, pb2),
                        patch_lengths=_patch_lengths(item),
                        usage=_usage(item, pb2),
                        model=model,
                    )

    async def Score(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import bytelm_pb2 as pb2

        with self.serving(grpc_context):
            request = parse(pb2.ScoreRequest, request, grpc_context)
            try:
                text = score_text(request, self.limits)
            except InvalidArgument as e:
                abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            model, handle = self.model(request.model, "Score", grpc_context)
            with model_errors(grpc_context):
                result = await handle.score.remote(text)
            return pb2.ScoreResponse(
                entropies=result.entropies,
                patch_lengths=result.patch_lengths,
                bits_per_byte=result.bits_per_byte,
                model=model,
            )


SERVICE = GrpcService(
    name="patchwork.v1.ByteLM",
    rpcs=frozenset({"Generate", "GenerateStream", "Score"}),
    handlers=ByteLMHandlers,
    add_to_server="patchwork.serving.grpc_services.add_ByteLM_to_server",
)
