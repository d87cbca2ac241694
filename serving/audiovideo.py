"""The ``patchwork.v1.AudioVideo`` service (MAViL): Embed, Classify and Retrieve.

The gateway decodes and checks each request's clip (``read_clip``: sizes,
formats, sample rates, shapes, dtypes and NaN/inf, every failure an
INVALID_ARGUMENT naming the field) and sends the decoded clip to the
model's ``MavilServer`` replica, whose engine batches the clips of
concurrent requests into shared forward passes.
"""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np
from ray.serve.grpc_util import RayServegRPCContext

from patchwork.engines.mavil.engine import Clip
from patchwork.serving.config import Limits
from patchwork.serving.gateway import abort, model_errors, parse
from patchwork.serving.grpc_services import GrpcService
from patchwork.serving.images import read_image
from patchwork.serving.model_server import ModelServer, monotonic_deadline
from patchwork.serving.sounds import checked_sound, read_sound
from patchwork.serving.validation import InvalidArgument

DEFAULT_TOP_K = 5
_AUDIO_DTYPES = {"float32": np.float32, "float64": np.float64, "int16": np.int16}
_VIDEO_DTYPES = {"uint8": np.uint8, "float32": np.float32, "float64": np.float64}


def _array(message, field: str, dtypes: dict, dims: int) -> np.ndarray:
    """A raw ``Array`` message -> its values, or InvalidArgument naming the field."""
    if message.dtype not in dtypes:
        raise InvalidArgument(f"{field}.dtype", f"{message.dtype!r}; expected one of {', '.join(dtypes)}")
    shape = tuple(message.shape)
    if len(shape) != dims or 0 in shape:
        raise InvalidArgument(f"{field}.shape", f"{list(shape)}; expected {dims} non-zero dimensions")
    dtype = np.dtype(dtypes[message.dtype]).newbyteorder("<")
    if len(message.data) != math.prod(shape) * dtype.itemsize:
        raise InvalidArgument(f"{field}.data", f"{len(message.data)} bytes; shape {list(shape)} of {message.dtype} "
                              f"takes {math.prod(shape) * dtype.itemsize}")
    values = np.frombuffer(message.data, dtype=dtype).reshape(shape)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InvalidArgument(f"{field}.data", "holds NaN or infinite values")
    return values


def _sound(clip, field: str, limits: Limits) -> np.ndarray | None:
    """The clip's sound as float32 samples at 16 kHz, or None."""
    if clip.wav and clip.HasField("audio"):
        raise InvalidArgument(f"{field}.audio", "send the sound once: wav or audio, not both")
    if clip.wav:
        return read_sound(clip.wav, f"{field}.wav", limits)
    if not clip.HasField("audio"):
        return None
    values = _array(clip.audio, f"{field}.audio", _AUDIO_DTYPES, 1)
    if not clip.sample_rate:
        raise InvalidArgument(f"{field}.sample_rate", "required with audio")
    samples = values.astype(np.float32) / (32768.0 if values.dtype.kind == "i" else 1.0)
    return checked_sound(samples, clip.sample_rate, f"{field}.audio", limits, rate_field=f"{field}.sample_rate")


def _pictures(clip, field: str, limits: Limits) -> np.ndarray | None:
    """The clip's frames as float32 (frames, height, width, 3) in [0, 1], or None."""
    if clip.frames and clip.HasField("video"):
        raise InvalidArgument(f"{field}.video", "send the frames once: frames or video, not both")
    if clip.frames:
        if len(clip.frames) > limits.max_frames:
            raise InvalidArgument(f"{field}.frames", f"{len(clip.frames)} frames; at most {limits.max_frames}")
        pictures, pixels = [], 0
        for i, data in enumerate(clip.frames):
            pictures.append(read_image(data, f"{field}.frames[{i}]", limits))
            pixels += pictures[-1].shape[0] * pictures[-1].shape[1]
            if pixels > limits.max_clip_pixels:  # small files can hold large, plain frames
                raise InvalidArgument(f"{field}.frames", f"over {limits.max_clip_pixels} pixels in all")
        for i, picture in enumerate(pictures):
            if picture.shape != pictures[0].shape:
                raise InvalidArgument(f"{field}.frames[{i}]", f"{picture.shape[1]}x{picture.shape[0]} pixels; frame "
                                      f"0 is {pictures[0].shape[1]}x{pictures[0].shape[0]}")
        return np.stack(pictures).astype(np.float32) / 255
    if not clip.HasField("video"):
        return None
    values = _array(clip.video, f"{field}.video", _VIDEO_DTYPES, 4)
    frames, height, width, channels = values.shape
    if channels != 3 or frames > limits.max_frames or max(height, width) > limits.max_image_side:
        raise InvalidArgument(f"{field}.video.shape", f"{list(values.shape)}; expected [frames <= "
                              f"{limits.max_frames}, height, width <= {limits.max_image_side}, 3]")
    if values.dtype == np.uint8:
        return values.astype(np.float32) / 255
    if values.min() < 0 or values.max() > 1:
        raise InvalidArgument(f"{field}.video.data", "float frames must lie in [0, 1]")
    return values.astype(np.float32)


def read_clip(clip, field: str, limits: Limits) -> Clip:
    """A ``Clip`` message -> the engine's Clip, or InvalidArgument naming the field."""
    size = len(clip.wav) + sum(map(len, clip.frames)) + len(clip.audio.data) + len(clip.video.data)
    if size > limits.max_clip_bytes:
        raise InvalidArgument(field, f"{size} bytes of sound and frames; at most {limits.max_clip_bytes}")
    sound, pictures = _sound(clip, field, limits), _pictures(clip, field, limits)
    if sound is None and pictures is None:
        raise InvalidArgument(field, "holds neither sound (wav or audio) nor frames (frames or video)")
    return Clip(sound, pictures)


def top_k(value: int, limits: Limits) -> int:
    if value > limits.max_top_k:
        raise InvalidArgument("top_k", f"{value} is over the limit of {limits.max_top_k}")
    return value or DEFAULT_TOP_K


class MavilServer(ModelServer):
    """A MAViL replica: ModelServer plus what the AudioVideo handlers call."""

    async def _embedding(self, clip: Clip, deadline: float | None):
        self._start_gauges()
        self._refuse_while_draining()
        future = self.engine.embed(clip, monotonic_deadline(deadline))
        self._record_load()
        try:
            return await asyncio.wrap_future(future)
        finally:
            future.cancel()  # the caller went away: drop the clip if its batch has not started

    async def embed(self, clip: Clip, deadline: float | None = None):
        return await self._embedding(clip, deadline)

    async def classify(self, clip: Clip, count: int, deadline: float | None = None):
        """(the head used, its best ``count`` labels, the windows read)."""
        self.engine.check_classifier()
        embedding = await self._embedding(clip, deadline)
        return *self.engine.classify(embedding, count), embedding.windows

    async def retrieve(self, clip: Clip, index: str, count: int, deadline: float | None = None):
        """(the modality searched, the best ``count`` matches, the windows read)."""
        searched = self.engine.searched_modality(clip, index)
        embedding = await self._embedding(clip, deadline)
        return searched, self.engine.retrieve(embedding, index, searched, count), embedding.windows


def _floats(vector) -> list[float]:
    return [] if vector is None else vector.tolist()


class AudioVideoHandlers:
    """The gateway's AudioVideo methods (mixed into ``serving.gateway.GatewayCore``)."""

    def _clip(self, context, clip, field: str, count: int | None = None):
        try:
            return read_clip(clip, field, self.limits), None if count is None else top_k(count, self.limits)
        except InvalidArgument as e:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))

    async def Embed(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import audiovideo_pb2 as pb2

        with self.serving(grpc_context):
            request = parse(pb2.EmbedRequest, request, grpc_context)
            clip, _ = self._clip(grpc_context, request.clip, "clip")
            model, handle = self.model(request.model, "Embed", grpc_context)
            with model_errors(grpc_context):
                embedding = await handle.embed.remote(clip, self.deadline(grpc_context))
            return pb2.EmbedResponse(audio=_floats(embedding.audio), video=_floats(embedding.video),
                                     fused=_floats(embedding.fused), shared_audio=_floats(embedding.shared_audio),
                                     shared_video=_floats(embedding.shared_video), windows=embedding.windows,
                                     model=model)

    async def Classify(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import audiovideo_pb2 as pb2

        with self.serving(grpc_context):
            request = parse(pb2.ClassifyRequest, request, grpc_context)
            clip, count = self._clip(grpc_context, request.clip, "clip", request.top_k)
            model, handle = self.model(request.model, "Classify", grpc_context)
            with model_errors(grpc_context):
                head, labels, windows = await handle.classify.remote(clip, count, self.deadline(grpc_context))
            return pb2.ClassifyResponse(labels=[pb2.Label(name=name, score=score) for name, score in labels],
                                        head=head, windows=windows, model=model)

    async def Retrieve(self, request, grpc_context: RayServegRPCContext):
        from patchwork.v1 import audiovideo_pb2 as pb2

        with self.serving(grpc_context):
            request = parse(pb2.RetrieveRequest, request, grpc_context)
            if not request.index:
                abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, "index: required")
            clip, count = self._clip(grpc_context, request.query, "query", request.top_k)
            model, handle = self.model(request.model, "Retrieve", grpc_context)
            with model_errors(grpc_context):
                searched, matches, windows = await handle.retrieve.remote(clip, request.index, count,
                                                                          self.deadline(grpc_context))
            return pb2.RetrieveResponse(matches=[pb2.Match(id=i, score=score) for i, score in matches],
                                        searched=searched, windows=windows, model=model)


SERVICE = GrpcService(
    name="patchwork.v1.AudioVideo",
    rpcs=frozenset({"Embed", "Classify", "Retrieve"}),
    handlers=AudioVideoHandlers,
    add_to_server="patchwork.serving.grpc_services.add_AudioVideo_to_server",
)
