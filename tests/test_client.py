"""The client library (``patchwork.Client`` and ``patchwork.AsyncClient``):
every RPC against the test server, streams left early, deadlines, auth, and
its retries against a gRPC server that answers as a test scripts it."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest

from patchwork import AsyncClient, Client, Retry
from patchwork.client import NO_RETRY
from patchwork.training.mavil.train import HELDOUT_START
from patchwork.v1 import audiovideo_pb2_grpc, bytelm_pb2, models_pb2, multimodal_pb2, multimodal_pb2_grpc
from tests.conftest import AUTH_TOKEN, CM3LEON_MODEL, MAVIL_MODEL, WIDE_MODEL
from tests.helpers import idle, wait_until
from tests.test_audiovideo import files_clip


@pytest.fixture(scope="module")
def client(grpc_target):
    with Client(grpc_target, token=AUTH_TOKEN, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def clip(mavil_world):
    from patchwork.v1 import audiovideo_pb2

    return files_clip(audiovideo_pb2, mavil_world[HELDOUT_START + 3])


DECODING = {"guidance": "GUIDANCE_CLASSIFIER_FREE", "guidance_scale": 3.0, "temperature": 1.0, "seed": 7}


def test_every_rpc_answers_as_the_generated_stub_does(client, channel, stub, clip):
    """Each method sends the request its arguments spell: the answer equals the
    raw stub's for the same request (greedy or seeded, so reproducible)."""
    generated = client.generate("def ", max_new_bytes=24, stop=["\n\n"])
    assert generated == stub.Generate(bytelm_pb2.GenerateRequest(prompt=b"def ", max_new_bytes=24, stop=[b"\n\n"]),
                                      timeout=120)
    chunks = list(client.generate_stream(b"def ", max_new_bytes=24, stop=[b"\n\n"]))
    assert b"".join(chunk.text for chunk in chunks) == generated.text
    assert chunks[-1].finish_reason == generated.finish_reason and chunks[-1].usage == generated.usage
    assert client.score("def main():") == stub.Score(bytelm_pb2.ScoreRequest(text=b"def main():"), timeout=120)

    multimodal = multimodal_pb2_grpc.MultimodalStub(channel)
    images = client.generate_image("a large red circle at the top left", samples=2, decoding=DECODING, documents=0)
    assert images == multimodal.GenerateImage(multimodal_pb2.GenerateImageRequest(
        prompt="a large red circle at the top left", samples=2, decoding=multimodal_pb2.Decoding(**DECODING),
        documents=0), timeout=120)
    assert images.model == CM3LEON_MODEL and len(images.images) == 2
    png = images.images[0].png
    caption = client.caption(png, alt_text="stock photo", max_new_bytes=24)
    assert caption == multimodal.Caption(multimodal_pb2.CaptionRequest(image=png, alt_text="stock photo",
                                                                       max_new_bytes=24), timeout=120)
    infilled = client.infill("a large <mask> circle", image=png, max_new_bytes=8)
    assert infilled == multimodal.Infill(multimodal_pb2.InfillRequest(text="a large <mask> circle", image=png,
                                                                      max_new_bytes=8), timeout=120)
    assert len(infilled.spans) == 1

    from patchwork.v1 import audiovideo_pb2

    audiovideo = audiovideo_pb2_grpc.AudioVideoStub(channel)
    embedded = client.embed(wav=clip.wav, frames=clip.frames)
    assert embedded == audiovideo.Embed(audiovideo_pb2.EmbedRequest(clip=clip), timeout=120)
    assert embedded.model == MAVIL_MODEL
    assert client.classify(clip, top_k=2) == audiovideo.Classify(audiovideo_pb2.ClassifyRequest(clip=clip, top_k=2),
                                                                 timeout=120)
    retrieved = client.retrieve(wav=clip.wav, index="heldout", top_k=3)
    assert retrieved == audiovideo.Retrieve(audiovideo_pb2.RetrieveRequest(
        query=audiovideo_pb2.Clip(wav=clip.wav), index="heldout", top_k=3), timeout=120)
    assert len(retrieved.matches) == 3

    models = client.list_models()
    assert isinstance(models, models_pb2.ListModelsResponse)
    assert {CM3LEON_MODEL, MAVIL_MODEL, "tiny"} <= {model.name for model in models.models}
    assert client.health() == "SERVING"


def test_the_async_client_answers_every_rpc_as_the_blocking_one(grpc_target, client, clip):
    """Three models' calls at once, each model's in turn (so that no batch mixes them)."""
    async def calls():
        async with AsyncClient(grpc_target, token=AUTH_TOKEN, timeout=120) as aclient:
            async def bytelm():
                chunks = [chunk async for chunk in aclient.generate_stream("import ", max_new_bytes=16)]
                return [chunks, await aclient.generate("import ", max_new_bytes=16), await aclient.score("import os")]

            async def multimodal():
                return [await aclient.generate_image("a small blue square", decoding=DECODING),
                        await aclient.infill("a <mask> square", max_new_bytes=8)]

            async def audiovideo():
                return [await aclient.embed(clip), await aclient.classify(clip),
                        await aclient.retrieve(wav=clip.wav, index="heldout")]

            answers = await asyncio.gather(bytelm(), multimodal(), audiovideo())
            return [answer for group in answers for answer in group] + [await aclient.list_models(),
                                                                        await aclient.health()]

    chunks, *answers = asyncio.run(calls())
    assert answers == [
        client.generate("import ", max_new_bytes=16), client.score("import os"),
        client.generate_image("a small blue square", decoding=DECODING),
        client.infill("a <mask> square", max_new_bytes=8), client.embed(clip), client.classify(clip),
        client.retrieve(wav=clip.wav, index="heldout"), client.list_models(), "SERVING",
    ]
    assert b"".join(chunk.text for chunk in chunks) == answers[0].text


def test_leaving_a_stream_early_frees_its_batch_slot(grpc_target, client, wide_handle):
    wait_until(lambda: idle(wide_handle), timeout_s=120, what="the replica to be idle")
    for _ in client.generate_stream("long ", max_new_bytes=1900, model=WIDE_MODEL):
        break
    wait_until(lambda: idle(wide_handle), timeout_s=120, what="the stream left early to leave its slot")

    async def leave_early():
        async with AsyncClient(grpc_target, token=AUTH_TOKEN) as aclient:
            async for _ in aclient.generate_stream("long ", max_new_bytes=1900, model=WIDE_MODEL):
                break

    asyncio.run(leave_early())
    wait_until(lambda: idle(wide_handle), timeout_s=120, what="the async stream left early to leave its slot")


def test_a_deadline_ends_the_call_and_is_not_retried(client, wide_handle):
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        client.generate("slow", max_new_bytes=1900, model=WIDE_MODEL, timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 30
    wait_until(lambda: idle(wide_handle), timeout_s=120, what="the expired request to leave its slot")


def test_a_refusal_that_a_repeat_cannot_mend_is_not_retried(grpc_target, client):
    with Client(grpc_target, token="") as anonymous, pytest.raises(grpc.RpcError) as error:
        anonymous.generate("x")
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as error:
        client.generate("x", temperature=-1.0)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("temperature")


# -- retries, against a server that answers as scripted --------------------


class ScriptedByteLM:
    """A real gRPC server for patchwork.v1.ByteLM that answers each call with
    the next outcome of its script: a status code to abort with, "ok", or
    "chunk then UNAVAILABLE" for a stream that fails after its first message."""

    def __init__(self, script: list):
        self.script, self.calls = list(script), []
        self.server = grpc.server(futures.ThreadPoolExecutor(4))
        handlers = {
            "Generate": grpc.unary_unary_rpc_method_handler(
                self.generate, request_deserializer=bytelm_pb2.GenerateRequest.FromString,
                response_serializer=bytelm_pb2.GenerateResponse.SerializeToString),
            "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self.generate_stream, request_deserializer=bytelm_pb2.GenerateRequest.FromString,
                response_serializer=bytelm_pb2.GenerateStreamChunk.SerializeToString),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("patchwork.v1.ByteLM", handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.lock = threading.Lock()

    def _next(self, request, context):
        with self.lock:
            self.calls.append((time.monotonic(), request.prompt, dict(context.invocation_metadata())))
            outcome = self.script.pop(0) if self.script else "ok"
        if isinstance(outcome, grpc.StatusCode):
            context.abort(outcome, f"scripted {outcome.name}")
        return outcome

    def generate(self, request, context):
        self._next(request, context)
        return bytelm_pb2.GenerateResponse(text=request.prompt[::-1])

    def generate_stream(self, request, context):
        outcome = self._next(request, context)
        yield bytelm_pb2.GenerateStreamChunk(text=request.prompt[:1])
        if outcome == "chunk then UNAVAILABLE":
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted failure after a chunk")
        yield bytelm_pb2.GenerateStreamChunk(text=request.prompt[1:], finish_reason=bytelm_pb2.FINISH_REASON_LENGTH)

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *_):
        self.server.stop(grace=None)


FAST = Retry(attempts=4, initial_backoff_s=0.05, max_backoff_s=0.2)


def test_unavailable_and_resource_exhausted_are_retried_with_backoff():
    script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE]
    with ScriptedByteLM(script) as server, Client(f"127.0.0.1:{server.port}", token="t", retry=FAST) as client:
        assert client.generate("abc").text == b"cba"
    assert len(server.calls) == 4
    assert all(metadata["authorization"] == "Bearer t" for _, _, metadata in server.calls)
    waits = [later[0] - earlier[0] for earlier, later in zip(server.calls, server.calls[1:])]
    assert all(wait >= 0.5 * FAST.initial_backoff_s for wait in waits)


def test_retries_end_at_the_attempts_or_the_deadline_with_the_last_error():
    with ScriptedByteLM([grpc.StatusCode.UNAVAILABLE] * 9) as server, \
            Client(f"127.0.0.1:{server.port}", retry=FAST) as client, pytest.raises(grpc.RpcError) as error:
        client.generate("abc")
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and len(server.calls) == FAST.attempts
    # A deadline holds for all the attempts together; each backoff is at least half of 0.1 s.
    patient = Retry(attempts=1000, initial_backoff_s=0.1, max_backoff_s=0.1)
    with ScriptedByteLM([grpc.StatusCode.UNAVAILABLE] * 1000) as server, \
            Client(f"127.0.0.1:{server.port}", retry=patient) as client, pytest.raises(grpc.RpcError) as error:
        started = time.monotonic()
        client.generate("abc", timeout=1.0)
    assert error.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < 1.0 + 5  # ends at the deadline, whatever the attempts left
    assert 1 <= len(server.calls) <= 1.0 / 0.05 + 1
    with ScriptedByteLM([grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT]) as server, \
            Client(f"127.0.0.1:{server.port}", retry=FAST) as client, pytest.raises(grpc.RpcError) as error:
        client.generate("abc")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and len(server.calls) == 2
    with ScriptedByteLM([grpc.StatusCode.UNAVAILABLE]) as server, \
            Client(f"127.0.0.1:{server.port}", retry=NO_RETRY) as client, pytest.raises(grpc.RpcError):
        client.generate("abc")
    assert len(server.calls) == 1


def test_a_stream_is_retried_only_before_its_first_message():
    with ScriptedByteLM([grpc.StatusCode.UNAVAILABLE, "ok"]) as server, \
            Client(f"127.0.0.1:{server.port}", retry=FAST) as client:
        assert [chunk.text for chunk in client.generate_stream("abc")] == [b"a", b"bc"]
        assert len(server.calls) == 2
    with ScriptedByteLM(["chunk then UNAVAILABLE"]) as server, \
            Client(f"127.0.0.1:{server.port}", retry=FAST) as client:
        received = []
        with pytest.raises(grpc.RpcError) as error:
            for chunk in client.generate_stream("abc"):
                received.append(chunk.text)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert received == [b"a"] and len(server.calls) == 1  # a repeat would deliver "a" twice


def test_the_async_client_retries_alike():
    async def calls(port: int):
        async with AsyncClient(f"127.0.0.1:{port}", retry=FAST) as client:
            text = (await client.generate("abc")).text
            chunks = [chunk.text async for chunk in client.generate_stream("xyz")]
            return text, chunks

    script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, "ok", grpc.StatusCode.UNAVAILABLE]
    with ScriptedByteLM(script) as server:
        assert asyncio.run(calls(server.port)) == (b"cba", [b"x", b"yz"])
    assert [prompt for _, prompt, _ in server.calls] == [b"abc"] * 3 + [b"xyz"] * 2


def test_a_retry_policy_is_checked():
    with pytest.raises(ValueError, match="attempts must be at least 1"):
        Retry(attempts=0)
    backoffs = [Retry(initial_backoff_s=1.0, max_backoff_s=3.0).backoff_s(retry) for retry in range(4)]
    assert 0.5 <= backoffs[0] <= 1.0 and 1.0 <= backoffs[1] <= 2.0 and 1.5 <= backoffs[3] <= 3.0
