"""The ``patchwork.v1.Multimodal`` service (CM3Leon): GenerateImage, Caption and Infill.

Caption describes an image or, for a model trained on sound, a WAV file
(``serving.sounds``); a model not trained on sound answers INVALID_ARGUMENT
naming ``audio``. Either backbone (dense or Mixture-of-Transformers) serves
every RPC the same way.

The gateway checks each request (texts against the prompt limit, images with
``serving.images``, decoding settings through ``Cm3Params``), and the model's
``Cm3LeonServer`` replica runs it: every sample of a GenerateImage request
is its own sequence on the engine's scheduler (they run in one batch), and
the images come back ranked by the model's likelihood of the prompt as their
caption. ``GUIDANCE_MIXED`` draws the first half of the samples with the
request's sampling alone and the rest with CD-K, then ranks them together.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from pydantic import ValidationError
from ray.serve.grpc_util import RayServegRPCContext

from patchwork.engines.cm3leon.engine import MASK_MARKER
from patchwork.serving.config import Limits
from patchwork.serving.gateway import abort, model_errors, parse
from patchwork.serving.grpc_services import GrpcService
from patchwork.serving.images import fit, png, read_image
from patchwork.serving.model_server import ModelServer
from patchwork.serving.sounds import read_sound
from patchwork.serving.validation import InvalidArgument

# patchwork.v1.Guidance -> engines.cm3leon.decoding.Guidance (values), per sample.
_GUIDANCE = {0: "none", 1: "none", 2: "classifier_free", 3: "contrastive"}
MIXED = 4


def _check_text(field: str, text: str, limits: Limits) -> None:
    if len(text.encode()) > limits.max_prompt_bytes:
        raise InvalidArgument(field, f"{len(text.encode())} bytes is over the limit of {limits.max_prompt_bytes}")


def sample_params(decoding, samples: int, max_new_bytes: int, limits: Limits) -> list:
    """The ``Cm3Params`` of each sample (seed + i), or InvalidArgument naming the field."""
    from patchwork.engines.cm3leon.decoding import Cm3Params

    if decoding.guidance not in (*_GUIDANCE, MIXED):
        raise InvalidArgument("decoding.guidance", f"unknown value {decoding.guidance}")
    if max_new_bytes > limits.max_new_bytes:
        raise InvalidArgument("max_new_bytes", f"{max_new_bytes} is over the limit of {limits.max_new_bytes}")
    settings = {"temperature": decoding.temperature, "top_p": decoding.top_p or 1.0, "top_k": decoding.top_k,
                "max_new_bytes": max_new_bytes or limits.default_new_bytes}
    for name, value in [("guidance_scale", decoding.guidance_scale), ("contrastive_alpha", decoding.contrastive_alpha),
                        ("contrastive_k", decoding.contrastive_k)]:
        if value:
            settings[name] = value
    params = []
    for i in range(samples):
        guidance = _GUIDANCE[decoding.guidance] if decoding.guidance != MIXED else (
            "none" if i < (samples + 1) // 2 else "contrastive")
        try:
            params.append(Cm3Params(**settings, guidance=guidance, seed=(decoding.seed + i) % 2**64))
        except ValidationError as e:
            error = e.errors()[0]
            raise InvalidArgument(f"decoding.{error['loc'][0]}", error["msg"]) from None
    return params


class Cm3LeonServer(ModelServer):
    """A CM3Leon replica: ModelServer plus what the Multimodal handlers call."""

    async def _generations(self, prompt, params: list, deadline: float | None) -> list:
        return await asyncio.gather(*(self.generate(prompt, p, deadline) for p in params))

    async def generate_image(self, text: str, params: list, documents: int | None,
                             deadline: float | None = None) -> list[tuple[bytes, str, float]]:
        """(PNG, guidance, score) of each sample, best first."""
        self._refuse_while_draining()
        results = await self._generations(self.engine.image_prompt(text, documents), params, deadline)
        loop = asyncio.get_running_loop()

        def finish() -> list[tuple[bytes, str, float]]:
            images = self.engine.images(results)
            scores = self.engine.caption_scores(results, text)
            ranked = sorted(zip(images, params, scores), key=lambda item: -item[2])
            return [(png(image), p.guidance.value, score) for image, p, score in ranked]

        return await loop.run_in_executor(self.worker, finish)

    async def caption(self, image: np.ndarray, alt_text: str, params, documents: int | None,
                      deadline: float | None = None) -> str:
        self._refuse_while_draining()
        pixels = fit(image, self.engine.config.vq.image_size)
        return await self._caption(self.engine.caption_prompt(pixels, documents, alt_text), params, deadline)

    async def caption_sound(self, samples: np.ndarray, params, deadline: float | None = None) -> str:
        """A sound (float32 at 16 kHz) -> its caption; INVALID_ARGUMENT from a model not trained on sound."""
        self._refuse_while_draining()
        return await self._caption(self.engine.audio_caption_prompt(samples), params, deadline)

    async def _caption(self, prompt, params, deadline: float | None) -> str:
        result = await self.generate(prompt, params, deadline)
        return result.text.decode(errors="replace")

    async def infill(self, text: str, image: np.ndarray | None, params, deadline: float | None = None) -> list[str]:
        self._refuse_while_draining()
        pixels = None if image is None else fit(image, self.engine.config.vq.image_size)
        result = await self.generate(self.engine.infill_prompt(text, pixels), params, deadline)
        return self.engine.spans(result, text.count(MASK_MARKER))


class MultimodalHandlers:
    """The gateway's Multimodal methods (mixed into ``serving.gateway.GatewayCore``)."""

    def _checked(self, context, check):
        try:
            return check()
        except InvalidArgument as e:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def GenerateImage(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import multimodal_pb2 as pb2

        with self.serving(grpc_context):
            request = parse(pb2.GenerateImageRequest, request, grpc_context)

            def check():
                _check_text("prompt", request.prompt, self.limits)
                samples = request.samples or 1
                if samples > self.limits.max_samples:
                    raise InvalidArgument("samples", f"{samples} is over the limit of {self.limits.max_samples}")
                return sample_params(request.decoding, samples, 0, self.limits)

            params = self._checked(grpc_context, check)
            model, handle = self.model(request.model, "GenerateImage", grpc_context)
            documents = request.documents if request.HasField("documents") else None
            with model_errors(grpc_context):
                images = await handle.generate_image.remote(request.prompt, params, documents,
                                                            self.deadline(grpc_context))
            guidance = {"none": pb2.GUIDANCE_NONE, "classifier_free": pb2.GUIDANCE_CLASSIFIER_FREE,
                        "contrastive": pb2.GUIDANCE_CONTRASTIVE}
            return pb2.GenerateImageResponse(images=[
                pb2.GeneratedImage(png=data, guidance=guidance[used], score=score) for data, used, score in images
            ], model=model)

    async def Caption(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import multimodal_pb2 as pb2

        with self.serving(grpc_context):
            request = parse(pb2.CaptionRequest, request, grpc_context)

            def check():
                _check_text("alt_text", request.alt_text, self.limits)
                if request.audio:
                    if request.image:
                        raise InvalidArgument("audio", "send an image or a sound, not both")
                    if request.alt_text:
                        raise InvalidArgument("alt_text", "re-aligns an image's text; a sound has none")
                    if request.HasField("documents") and request.documents:
                        raise InvalidArgument("documents", "retrieval finds images; a sound's caption reads none")
                    media = read_sound(request.audio, "audio", self.limits)
                else:
                    media = read_image(request.image, "image", self.limits)
                return media, sample_params(request.decoding, 1, request.max_new_bytes, self.limits)[0]

            media, params = self._checked(grpc_context, check)
            model, handle = self.model(request.model, "Caption", grpc_context)
            documents = request.documents if request.HasField("documents") else None
            with model_errors(grpc_context):
                if request.audio:
                    text = await handle.caption_sound.remote(media, params, self.deadline(grpc_context))
                else:
                    text = await handle.caption.remote(media, request.alt_text, params, documents,
                                                       self.deadline(grpc_context))
            return pb2.CaptionResponse(text=text, model=model)

    async def Infill(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import multimodal_pb2 as pb2

        with self.serving(grpc_context):
            request = parse(pb2.InfillRequest, request, grpc_context)

            def check():
                _check_text("text", request.text, self.limits)
                if MASK_MARKER not in request.text:
                    raise InvalidArgument("text", f"no {MASK_MARKER} to fill")
                image = read_image(request.image, "image", self.limits) if request.image else None
                return image, sample_params(request.decoding, 1, request.max_new_bytes, self.limits)[0]

            image, params = self._checked(grpc_context, check)
            model, handle = self.model(request.model, "Infill", grpc_context)
            with model_errors(grpc_context):
                spans = await handle.infill.remote(request.text, image, params, self.deadline(grpc_context))
            return pb2.InfillResponse(spans=spans, model=model)


SERVICE = GrpcService(
    name="patchwork.v1.Multimodal",
    rpcs=frozenset({"GenerateImage", "Caption", "Infill"}),
    handlers=MultimodalHandlers,
    add_to_server="patchwork.serving.grpc_services.add_Multimodal_to_server",
)
