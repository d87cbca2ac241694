"""Python clients of a Patchwork server: ``Client`` (blocking) and
``AsyncClient`` (asyncio), one method per RPC of every service.

    from patchwork import Client

    with Client("127.0.0.1:9010", token="...") as client:
        print(client.generate("def ", max_new_bytes=64).text)
        for chunk in client.generate_stream("import ", temperature=0.8, seed=1):
            print(chunk.text)

A client with no ``target`` calls ``$PATCHWORK_TARGET`` or the gateway's
default port, 127.0.0.1:9010; with no ``token``, it sends
``$PATCHWORK_AUTH_TOKEN`` when that is set (``token=""`` sends none); with a
``ca_file`` (or ``$PATCHWORK_CA_FILE``) it speaks TLS and trusts the server
whose certificate that CA signed (a server started with ``--tls-cert``).
Methods take the request's fields as keyword arguments and return the
service's response messages (``patchwork.v1``); a streaming RPC returns an
iterator (an async iterator in ``AsyncClient``), and leaving it early
cancels the call, which frees its batch slot on the server. Errors are
``grpc.RpcError`` with the server's status code and message.

Every call has a deadline: ``timeout`` seconds (the client's default unless
the call gives one), for all its attempts together. A call the server
answers with UNAVAILABLE (a replica or the server restarting, a drain) or
RESOURCE_EXHAUSTED (queues full) is made again after an exponential backoff
with jitter, up to ``Retry.attempts`` calls in all, while its deadline
allows. Every Patchwork RPC computes without changing anything on the
server, so repeating one is safe; a stream is repeated only before its first
message arrives (after that a repeat would deliver its bytes twice).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from patchwork.v1 import (
    audiovideo_pb2,
    audiovideo_pb2_grpc,
    bytelm_pb2,
    bytelm_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    multimodal_pb2,
    multimodal_pb2_grpc,
)

log = logging.getLogger(__name__)

ClientInterceptor = grpc.UnaryUnaryClientInterceptor | grpc.UnaryStreamClientInterceptor

DEFAULT_TARGET = "127.0.0.1:9010"
TARGET_ENV, TOKEN_ENV, CA_FILE_ENV = "PATCHWORK_TARGET", "PATCHWORK_AUTH_TOKEN", "PATCHWORK_CA_FILE"
# A call's deadline when neither it nor the client names one.
DEFAULT_TIMEOUT_S = 300.0
# each service's generated stub and its RPCs
SERVICES = {
    "patchwork.v1.ByteLM": (bytelm_pb2_grpc.ByteLMStub, ("Generate", "GenerateStream", "Score")),
    "patchwork.v1.Multimodal": (multimodal_pb2_grpc.MultimodalStub, ("GenerateImage", "Caption", "Infill")),
    "patchwork.v1.AudioVideo": (audiovideo_pb2_grpc.AudioVideoStub, ("Embed", "Classify", "Retrieve")),
    "patchwork.v1.Models": (models_pb2_grpc.ModelsStub, ("ListModels",)),
}


@dataclass(frozen=True)
class Retry:
    """When and how often a call is made again."""

    attempts: int = 5  # calls in all, the first included; 1 never retries
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    codes: frozenset[grpc.StatusCode] = field(
        default=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}))

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {self.attempts}")

    def backoff_s(self, retry: int) -> float:
        """The wait before retry number ``retry`` (0 for the first): exponential,
        capped, with jitter so that clients refused together do not return together."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return ceiling * random.uniform(0.5, 1.0)


NO_RETRY = Retry(attempts=1)


class _Attempts:
    """The attempts of one call: the time each may take, and whether a failure is tried again."""

    def __init__(self, retry: Retry, timeout_s: float, what: str):
        self.retry, self.what, self.made = retry, what, 0
        self.deadline = time.monotonic() + timeout_s

    def remaining_s(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def again_after(self, error: grpc.RpcError) -> float | None:
        """The seconds to wait before the next attempt, or None when ``error`` is final."""
        self.made += 1
        if error.code() not in self.retry.codes or self.made >= self.retry.attempts:
            return None
        wait_s = self.retry.backoff_s(self.made - 1)
        if wait_s >= self.remaining_s():
            return None
        log.info("%s: %s (%s); attempt %d of %d in %.2f s", self.what, error.code().name, error.details(),
                 self.made + 1, self.retry.attempts, wait_s)
        return wait_s


def _text(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _decoding(decoding: multimodal_pb2.Decoding | Mapping[str, Any] | None) -> multimodal_pb2.Decoding | None:
    """A ``Decoding`` message, or one built from its fields (an enum by number or name,
    e.g. ``{"guidance": "GUIDANCE_CLASSIFIER_FREE", "guidance_scale": 3.0}``)."""
    if decoding is None or isinstance(decoding, multimodal_pb2.Decoding):
        return decoding
    return multimodal_pb2.Decoding(**decoding)


def _clip(clip: audiovideo_pb2.Clip | None, wav: bytes, frames: Iterable[bytes]) -> audiovideo_pb2.Clip:
    """The clip given, or one of a WAV file's bytes and PNG/JPEG frames in order."""
    return clip if clip is not None else audiovideo_pb2.Clip(wav=wav, frames=list(frames))


def _generate_request(prompt, max_new_bytes, temperature, top_p, top_k, seed, stop,
                      model) -> bytelm_pb2.GenerateRequest:
    return bytelm_pb2.GenerateRequest(prompt=_text(prompt), max_new_bytes=max_new_bytes, temperature=temperature,
                                      top_p=top_p, top_k=top_k, seed=seed, stop=[_text(s) for s in stop], model=model)


def _documents(documents: int | None) -> dict:
    return {} if documents is None else {"documents": documents}


class _Base:
    """What both clients share: the channel, and one method per RPC that builds
    its request; each client makes the calls its own way (``_unary``, ``_stream``)."""

    def __init__(self, target: str | None, token: str | None, ca_file: str | os.PathLike | None, timeout: float,
                 retry: Retry, credentials: grpc.ChannelCredentials | None, options: Iterable[tuple[str, Any]],
                 interceptors: Iterable, aio: bool):
        target = target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET
        token = os.environ.get(TOKEN_ENV) if token is None else token
        ca_file = ca_file or os.environ.get(CA_FILE_ENV)
        if credentials is None and ca_file:
            credentials = grpc.ssl_channel_credentials(root_certificates=Path(ca_file).read_bytes())
        self.target, self.timeout, self.retry = target, timeout, retry
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        channel_options = {"options": list(options)}
        if aio:
            channel_options["interceptors"] = list(interceptors)
            self.channel = (grpc.aio.secure_channel(target, credentials, **channel_options) if credentials
                            else grpc.aio.insecure_channel(target, **channel_options))
        else:
            raw = (grpc.secure_channel(target, credentials, **channel_options) if credentials
                   else grpc.insecure_channel(target, **channel_options))
            self.channel = grpc.intercept_channel(raw, *interceptors) if interceptors else raw
        # RPC name -> the stub's method (RPC names are unique across Patchwork's services)
        self._methods = {}
        for stub_type, rpcs in SERVICES.values():
            stub = stub_type(self.channel)
            self._methods.update({rpc: getattr(stub, rpc) for rpc in rpcs})
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _attempts(self, rpc: str, timeout: float | None) -> _Attempts:
        return _Attempts(self.retry, self.timeout if timeout is None else timeout, rpc)

    def _unary(self, rpc: str, request, timeout: float | None):
        raise NotImplementedError

    def _stream(self, rpc: str, request, timeout: float | None):
        raise NotImplementedError

    # -- patchwork.v1.ByteLM ------------------------------------------------

    def generate(self, prompt: bytes | str, *, max_new_bytes: int = 0, temperature: float = 0.0, top_p: float = 0.0,
                 top_k: int = 0, seed: int = 0, stop: Iterable[bytes | str] = (), model: str = "",
                 timeout: float | None = None) -> bytelm_pb2.GenerateResponse:
        """A continuation of ``prompt`` (``max_new_bytes`` 0: the server's default)."""
        request = _generate_request(prompt, max_new_bytes, temperature, top_p, top_k, seed, stop, model)
        return self._unary("Generate", request, timeout)

    def generate_stream(self, prompt: bytes | str, *, max_new_bytes: int = 0, temperature: float = 0.0,
                        top_p: float = 0.0, top_k: int = 0, seed: int = 0, stop: Iterable[bytes | str] = (),
                        model: str = "", timeout: float | None = None) -> Iterator[bytelm_pb2.GenerateStreamChunk]:
        """The same continuation in chunks that never split a UTF-8 character;
        the last carries the finish reason and usage."""
        request = _generate_request(prompt, max_new_bytes, temperature, top_p, top_k, seed, stop, model)
        return self._stream("GenerateStream", request, timeout)

    def score(self, text: bytes | str, *, model: str = "", timeout: float | None = None) -> bytelm_pb2.ScoreResponse:
        """Per-byte entropies, patches and bits per byte of ``text``."""
        return self._unary("Score", bytelm_pb2.ScoreRequest(text=_text(text), model=model), timeout)

    # -- patchwork.v1.Multimodal --------------------------------------------

    def generate_image(self, prompt: str, *, samples: int = 1, decoding=None, documents: int | None = None,
                       model: str = "", timeout: float | None = None) -> multimodal_pb2.GenerateImageResponse:
        """``samples`` PNG images for ``prompt``, best first (``decoding``: a ``Decoding``
        or its fields; ``documents``: retrieved documents, None for the model's default)."""
        request = multimodal_pb2.GenerateImageRequest(prompt=prompt, samples=samples, decoding=_decoding(decoding),
                                                      model=model, **_documents(documents))
        return self._unary("GenerateImage", request, timeout)

    def caption(self, image: bytes = b"", *, audio: bytes = b"", alt_text: str = "", decoding=None,
                documents: int | None = None, max_new_bytes: int = 0, model: str = "",
                timeout: float | None = None) -> multimodal_pb2.CaptionResponse:
        """Text for a PNG or JPEG ``image`` (an ``alt_text`` is re-aligned to it), or for a WAV ``audio``."""
        request = multimodal_pb2.CaptionRequest(image=image, audio=audio, alt_text=alt_text,
                                                decoding=_decoding(decoding), max_new_bytes=max_new_bytes,
                                                model=model, **_documents(documents))
        return self._unary("Caption", request, timeout)

    def infill(self, text: str, *, image: bytes = b"", decoding=None, max_new_bytes: int = 0, model: str = "",
               timeout: float | None = None) -> multimodal_pb2.InfillResponse:
        """The spans of ``text``'s ``<mask>`` markers, optionally about an image."""
        request = multimodal_pb2.InfillRequest(text=text, image=image, decoding=_decoding(decoding),
                                               max_new_bytes=max_new_bytes, model=model)
        return self._unary("Infill", request, timeout)

    # -- patchwork.v1.AudioVideo --------------------------------------------

    def embed(self, clip: audiovideo_pb2.Clip | None = None, *, wav: bytes = b"", frames: Iterable[bytes] = (),
              model: str = "", timeout: float | None = None) -> audiovideo_pb2.EmbedResponse:
        """Audio, video and fused embeddings of a clip (``clip``, or its WAV bytes and frames)."""
        request = audiovideo_pb2.EmbedRequest(clip=_clip(clip, wav, frames), model=model)
        return self._unary("Embed", request, timeout)

    def classify(self, clip: audiovideo_pb2.Clip | None = None, *, wav: bytes = b"", frames: Iterable[bytes] = (),
                 top_k: int = 0, model: str = "", timeout: float | None = None) -> audiovideo_pb2.ClassifyResponse:
        """The most likely classes of a clip."""
        request = audiovideo_pb2.ClassifyRequest(clip=_clip(clip, wav, frames), top_k=top_k, model=model)
        return self._unary("Classify", request, timeout)

    def retrieve(self, query: audiovideo_pb2.Clip | None = None, *, index: str, wav: bytes = b"",
                 frames: Iterable[bytes] = (), top_k: int = 0, model: str = "",
                 timeout: float | None = None) -> audiovideo_pb2.RetrieveResponse:
        """The clips of ``index`` nearest a one-modality query."""
        request = audiovideo_pb2.RetrieveRequest(query=_clip(query, wav, frames), index=index, top_k=top_k,
                                                 model=model)
        return self._unary("Retrieve", request, timeout)

    # -- patchwork.v1.Models ------------------------------------------------

    def list_models(self, *, timeout: float | None = None) -> models_pb2.ListModelsResponse:
        """The served models with their config and held-out metrics."""
        return self._unary("ListModels", models_pb2.ListModelsRequest(), timeout)


class Client(_Base):
    """A blocking client. ``target`` is host:port (the gateway's own port by
    default; Ray Serve's proxy port answers too); ``token`` is sent as
    ``authorization: Bearer <token>``; ``ca_file`` (PEM) makes the channel TLS,
    trusting what that CA signed (``credentials``: any other gRPC channel
    credentials); ``timeout`` is a call's deadline in seconds unless it names its own;
    ``options`` are gRPC channel options and ``interceptors`` gRPC client
    interceptors (e.g. the load tests' timing)."""

    def __init__(self, target: str | None = None, *, token: str | None = None,
                 ca_file: str | os.PathLike | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 retry: Retry = Retry(), credentials: grpc.ChannelCredentials | None = None,
                 options: Iterable[tuple[str, Any]] = (), interceptors: Sequence[ClientInterceptor] = ()):
        super().__init__(target, token, ca_file, timeout, retry, credentials, options, interceptors, aio=False)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """``grpc.health.v1.Health/Check``: "SERVING" or "NOT_SERVING" (not retried: it is the question)."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                      timeout=self.timeout if timeout is None else timeout, metadata=self._metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _unary(self, rpc: str, request, timeout: float | None):
        attempts = self._attempts(rpc, timeout)
        while True:
            try:
                return self._methods[rpc](request, timeout=attempts.remaining_s(), metadata=self._metadata)
            except grpc.RpcError as error:
                wait_s = attempts.again_after(error)
                if wait_s is None:
                    raise
                time.sleep(wait_s)

    def _stream(self, rpc: str, request, timeout: float | None) -> Iterator:
        attempts = self._attempts(rpc, timeout)
        while True:
            call = self._methods[rpc](request, timeout=attempts.remaining_s(), metadata=self._metadata)
            try:
                try:
                    first = next(call)
                except StopIteration:
                    return
                except grpc.RpcError as error:
                    wait_s = attempts.again_after(error)
                    if wait_s is None:
                        raise
                    time.sleep(wait_s)
                    continue
                yield first
                yield from call
                return
            finally:
                call.cancel()  # nothing once the call has ended; frees the server's slot when the caller stops early


class AsyncClient(_Base):
    """The asyncio twin of ``Client``: the same arguments and methods; each
    method returns an awaitable of the same response, and a streaming one an
    async iterator. Create it inside a running event loop."""

    def __init__(self, target: str | None = None, *, token: str | None = None,
                 ca_file: str | os.PathLike | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 retry: Retry = Retry(), credentials: grpc.ChannelCredentials | None = None,
                 options: Iterable[tuple[str, Any]] = (), interceptors: Sequence[grpc.aio.ClientInterceptor] = ()):
        super().__init__(target, token, ca_file, timeout, retry, credentials, options, interceptors, aio=True)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_) -> None:
        await self.close()

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """``grpc.health.v1.Health/Check``: "SERVING" or "NOT_SERVING" (not retried: it is the question)."""
        response = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                            timeout=self.timeout if timeout is None else timeout,
                                            metadata=self._metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def _unary(self, rpc: str, request, timeout: float | None):
        attempts = self._attempts(rpc, timeout)
        while True:
            try:
                return await self._methods[rpc](request, timeout=attempts.remaining_s(), metadata=self._metadata)
            except grpc.RpcError as error:
                wait_s = attempts.again_after(error)
                if wait_s is None:
                    raise
                await asyncio.sleep(wait_s)

    async def _stream(self, rpc: str, request, timeout: float | None) -> AsyncIterator:
        attempts = self._attempts(rpc, timeout)
        while True:
            call = self._methods[rpc](request, timeout=attempts.remaining_s(), metadata=self._metadata)
            try:
                try:
                    first = await call.read()
                except grpc.RpcError as error:
                    wait_s = attempts.again_after(error)
                    if wait_s is None:
                        raise
                    await asyncio.sleep(wait_s)
                    continue
                message = first
                while message is not grpc.aio.EOF:
                    yield message
                    message = await call.read()
                return
            finally:
                call.cancel()
