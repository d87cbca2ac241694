"""The ``patchwork.v1.Multimodal`` service (CM3Leon): GenerateImage, Caption and Infill.

Caption describes an image or, for a model trained on sound, a WAV file
(``serving.sounds``); a model not trained on sound answers INVALID_ARGUMENT
naming ``audio``. Either backbone (dense or Mixture-of-Transformers) serves
every RPC the same way.

The gateway checks each request (texts against the prompt limit, images with
``serving.images``, the decoding settings it sets through ``Cm3Params``),
and the model's ``Cm3LeonServer`` replica runs it: settings the request
leaves unset take the model's defaults (``engines.cm3leon.decoding``; shown
by ListModels), every sample of a GenerateImage request is its own sequence
on the engine's scheduler (they run in one batch), and the images come back
ranked by the model's likelihood of the prompt as their caption.
``GUIDANCE_MIXED`` draws the first half of the samples with classifier-free
guidance and the rest with CD-K, then ranks them together. A caption's or an
infill's budget left unset is the server's default or what the model's
context leaves after the prompt, whichever is less.
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

# patchwork.v1.Guidance -> engines.cm3leon.decoding's names.
_GUIDANCE = {1: "none", 2: "classifier_free", 3: "contrastive", 4: "mixed"}


def _check_text(field: str, text: str, limits: Limits) -> None:
    if len(text.encode()) > limits.max_prompt_bytes:
        raise InvalidArgument(field, f"{len(text.encode())} bytes is over the limit of {limits.max_prompt_bytes}")


def explicit_decoding(decoding, max_new_bytes: int, limits: Limits) -> dict:
    """The decoding settings a request sets (``Cm3Params`` fields; the
    model's defaults fill in the rest), checked, or InvalidArgument naming
    the field."""
    from patchwork.engines.cm3leon.decoding import Cm3Params

    if decoding.guidance not in (0, *_GUIDANCE):
        raise InvalidArgument("decoding.guidance", f"unknown value {decoding.guidance}")
    if max_new_bytes > limits.max_new_bytes:
        raise InvalidArgument("max_new_bytes", f"{max_new_bytes} is over the limit of {limits.max_new_bytes}")
    explicit = {"seed": decoding.seed, "top_k": decoding.top_k}
    for name in ("temperature", "top_p", "guidance_scale"):
        if decoding.HasField(name):
            explicit[name] = getattr(decoding, name)
    for name in ("contrastive_alpha", "contrastive_k"):  # 0 is no valid value: it takes the default
        if getattr(decoding, name):
            explicit[name] = getattr(decoding, name)
    try:
        Cm3Params(**explicit)
    except ValidationError as e:
        error = e.errors()[0]
        raise InvalidArgument(f"decoding.{error['loc'][0]}", error["msg"]) from None
    if decoding.guidance:
        explicit["guidance"] = _GUIDANCE[decoding.guidance]
    return explicit


class Cm3LeonServer(ModelServer):
    """A CM3Leon replica: ModelServer plus what the Multimodal handlers call."""

    async def _generations(self, prompt, params: list, deadline: float | None) -> list:
        return await asyncio.gather(*(self.generate(prompt, p, deadline) for p in params))

    async def generate_image(self, text: str, decoding: dict, samples: int, documents: int | None,
                             deadline: float | None = None) -> list[tuple[bytes, str, float]]:
        """(PNG, guidance, score) of each sample, best first; ``decoding``:
        the settings the request set (``explicit_decoding``)."""
        self._refuse_while_draining()
        params = self.engine.params("image", decoding, samples)
        results = await self._generations(self.engine.image_prompt(text, documents), params, deadline)
        loop = asyncio.get_running_loop()

        def finish() -> list[tuple[bytes, str, float]]:
            images = self.engine.images(results)
            scores = self.engine.caption_scores(results, text)
            ranked = sorted(zip(images, params, scores), key=lambda item: -item[2])
            return [(png(image), p.guidance.value, score) for image, p, score in ranked]

        return await loop.run_in_executor(self.worker, finish)

    def _text_params(self, prompt, decoding: dict, budget: tuple[int, int], field: str):
        """A caption's or an infill's params; ``budget``: (the request's
        ``max_new_bytes``, 0 when unset; the server's default)."""
        requested, default = budget
        return self.engine.params("text", decoding, max_new_bytes=self.engine.text_budget(prompt, requested, default,
                                                                                          field))[0]

    async def caption(self, image: np.ndarray, alt_text: str, decoding: dict, budget: tuple[int, int],
                      documents: int | None, deadline: float | None = None) -> str:
        self._refuse_while_draining()
        pixels = fit(image, self.engine.config.vq.image_size)
        prompt = self.engine.caption_prompt(pixels, documents, alt_text)
        return await self._caption(prompt, self._text_params(prompt, decoding, budget, "alt_text"), deadline)

    async def caption_sound(self, samples: np.ndarray, decoding: dict, budget: tuple[int, int],
                            deadline: float | None = None) -> str:
        """A sound (float32 at 16 kHz) -> its caption; INVALID_ARGUMENT from a model not trained on sound."""
        self._refuse_while_draining()
        prompt = self.engine.audio_caption_prompt(samples)
        return await self._caption(prompt, self._text_params(prompt, decoding, budget, "audio"), deadline)

    async def _caption(self, prompt, params, deadline: float | None) -> str:
        result = await self.generate(prompt, params, deadline)
        return result.text.decode(errors="replace")

    async def infill(self, text: str, image: np.ndarray | None, decoding: dict, budget: tuple[int, int],
                     deadline: float | None = None) -> list[str]:
        self._refuse_while_draining()
        pixels = None if image is None else fit(image, self.engine.config.vq.image_size)
        prompt = self.engine.infill_prompt(text, pixels)
        result = await self.generate(prompt, self._text_params(prompt, decoding, budget, "text"), deadline)
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
                return explicit_decoding(request.decoding, 0, self.limits), samples

            decoding, samples = self._checked(grpc_context, check)
            model, handle = self.model(request.model, "GenerateImage", grpc_context)
            documents = request.documents if request.HasField("documents") else None
            with model_errors(grpc_context):
                images = await handle.generate_image.remote(request.prompt, decoding, samples, documents,
                                                            self.deadline(grpc_context))
            guidance = {name: number for number, name in _GUIDANCE.items()}
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
                return media, explicit_decoding(request.decoding, request.max_new_bytes, self.limits)

            media, decoding = self._checked(grpc_context, check)
            model, handle = self.model(request.model, "Caption", grpc_context)
            documents = request.documents if request.HasField("documents") else None
            budget = (request.max_new_bytes, self.limits.default_new_bytes)
            with model_errors(grpc_context):
                if request.audio:
                    text = await handle.caption_sound.remote(media, decoding, budget, self.deadline(grpc_context))
                else:
                    text = await handle.caption.remote(media, request.alt_text, decoding, budget, documents,
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
                return image, explicit_decoding(request.decoding, request.max_new_bytes, self.limits)

            image, decoding = self._checked(grpc_context, check)
            model, handle = self.model(request.model, "Infill", grpc_context)
            budget = (request.max_new_bytes, self.limits.default_new_bytes)
            with model_errors(grpc_context):
                spans = await handle.infill.remote(request.text, image, decoding, budget, self.deadline(grpc_context))
            return pb2.InfillResponse(spans=spans, model=model)


SERVICE = GrpcService(
    name="patchwork.v1.Multimodal",
    rpcs=frozenset({"GenerateImage", "Caption", "Infill"}),
    handlers=MultimodalHandlers,
    add_to_server="patchwork.serving.grpc_services.add_Multimodal_to_server",
)
