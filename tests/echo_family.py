"""A throwaway model family that keeps the engine contract with nothing but
the public pieces: it echoes its prompt back, each byte shifted by the one
weight it has. Registered through ``patchwork.engines.registry.register``, written as
an ordinary checkpoint, and served beside BLT by the same application: it
answers ByteLM's generation RPCs and a service of its own,
``patchwork.test.Echo/Reverse`` (a ``google.protobuf.Struct`` with ``text``
and ``model`` each way), from a deployment class of its own."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from patchwork.engines.api import (
    EngineStats,
    FinishReason,
    Generation,
    ModelInfo,
    Prompt,
    SamplingParams,
    Usage,
    text_of,
)
from patchwork.engines.checkpoint import Manifest, TrainingRecord, save_checkpoint
from patchwork.engines.registry import Family
from patchwork.engines.scheduler import Scheduler, SchedulerConfig
from patchwork.serving.families import BYTELM_SERVICE, GENERATION_RPCS, ServedFamily
from patchwork.serving.gateway import abort, model_errors, parse
from patchwork.serving.grpc_services import GrpcService
from patchwork.serving.model_server import ModelServer

START = 256  # the symbol before every prompt


class EchoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: Literal["echo"] = "echo"
    format_version: Literal[1] = 1


class EchoEngine:
    """The caches are one counter per slot: the bytes its sequence has echoed."""

    family = "echo"

    def __init__(self, shift: int, name: str, manifest: Manifest | None, scheduler: SchedulerConfig | None):
        self.shift, self.name, self.manifest = shift, name, manifest
        self.scheduler = Scheduler(self, scheduler or SchedulerConfig(), torch.device("cpu"))

    # -- engines.api.GenerativeEngine
    def describe(self) -> ModelInfo:
        return ModelInfo(name=self.name, family=self.family, config=EchoConfig().model_dump(),
                         metrics=dict(self.manifest.training.metrics) if self.manifest else {})

    def stats(self) -> EngineStats:
        return self.scheduler.stats()

    def submit(self, prompt: Prompt, params: SamplingParams, emit=None, deadline: float | None = None):
        return self.scheduler.submit(text_of(prompt, self.family), params, emit, deadline)

    def reverse(self, text: bytes) -> bytes:
        return bytes((byte + self.shift) % 256 for byte in reversed(text))

    def abort_all(self, reason: BaseException) -> int:
        return self.scheduler.abort_all(reason)

    def close(self) -> None:
        self.scheduler.close()

    # -- engines.scheduler.StepModel
    def request_cost(self, prompt: bytes, params: SamplingParams) -> dict[str, int]:
        return {"prompt": len(prompt) + 1, "max_new_bytes": params.max_new_bytes}

    def new_caches(self, slots: int, max_sequence_bytes: int) -> torch.Tensor:
        return torch.zeros(slots, dtype=torch.long)

    def move(self, caches: torch.Tensor, source: int, target: int) -> None:
        caches[target] = caches[source]
        caches[source] = 0  # the next sequence in it starts afresh

    def release(self, caches: torch.Tensor, slot: int) -> None:
        caches[slot] = 0

    def cache_bytes(self, caches: torch.Tensor, states: list) -> int:
        return caches.element_size() * len(states)

    def encode(self, prompt: bytes) -> list[int]:
        return [START, *prompt]

    def new_state(self, caches: torch.Tensor, prompt: bytes, symbols: list[int], params: SamplingParams) -> bytes:
        return prompt or b"\0"  # what the sequence echoes

    def step(self, caches, chunks, decodes):
        def logits(batch, echoed: torch.Tensor) -> torch.Tensor:
            rows = torch.full((len(batch.slots), START + 1), float("-inf"))
            for row, (state, count) in enumerate(zip(batch.states, echoed.tolist())):
                rows[row, (state[count % len(state)] + self.shift) % 256] = 0.0
            return rows

        chunk_logits = logits(chunks, caches[chunks.slots]) if chunks else None
        decode_logits = None
        if decodes:
            echoed = caches[decodes.slots] + 1  # the byte each decode just fed in
            decode_logits = logits(decodes, echoed)
            caches[decodes.slots] = echoed
        return chunk_logits, decode_logits

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def run_ahead(self, caches, slots, states, symbols):
        return None

    def accept(self, decoding, symbol: int, state=None, ahead=None) -> bytes:
        return decoding.accept(bytes([symbol]))

    def result(self, prompt: bytes, decoding, state) -> Generation:
        text = decoding.stop.text
        return Generation(text=text, finish_reason=decoding.finish_reason or FinishReason.LENGTH,
                          usage=Usage(prompt_tokens=len(prompt), generated_tokens=len(text)))


def build_engine(config: EchoConfig, weights: dict[str, torch.Tensor], *, device, dtype, name: str,
                 manifest: Manifest | None = None, scheduler: SchedulerConfig | None = None) -> EchoEngine:
    return EchoEngine(int(weights["shift"]), name, manifest, scheduler)


class EchoServer(ModelServer):
    """The family's deployment class: ModelServer plus what Reverse calls."""

    def reverse(self, text: bytes) -> bytes:
        self._refuse_while_draining()
        return self.engine.reverse(text)


class EchoHandlers:
    """The gateway's patchwork.test.Echo methods."""

    async def Reverse(self, request, grpc_context):  # noqa: N802 (gRPC naming)
        import grpc
        from google.protobuf import struct_pb2

        with self.serving(grpc_context):
            request = parse(struct_pb2.Struct, request, grpc_context)
            text = request.fields.get("text")
            if text is None or text.WhichOneof("kind") != "string_value":
                abort(grpc_context, grpc.StatusCode.INVALID_ARGUMENT, "text: a string is required")
            model = request.fields["model"].string_value if "model" in request.fields else ""
            model, handle = self.model(model, "Reverse", grpc_context)
            with model_errors(grpc_context):
                reversed_text = await handle.reverse.remote(text.string_value.encode())
            return struct_pb2.Struct(fields={"text": struct_pb2.Value(string_value=reversed_text.decode("latin-1")),
                                             "model": struct_pb2.Value(string_value=model)})


SERVICE = GrpcService(name="patchwork.test.Echo", rpcs=frozenset({"Reverse"}), handlers=EchoHandlers,
                      add_to_server="tests.echo_service.add_Echo_to_server")

FAMILY = Family(name="echo", config_type=EchoConfig, format_version=1, build_engine=build_engine)
SERVING = ServedFamily(services=(BYTELM_SERVICE, "tests.echo_family:SERVICE"), rpcs=GENERATION_RPCS | {"Reverse"},
                       deployment="tests.echo_family:EchoServer")


def write_checkpoint(path, shift: int) -> None:
    record = TrainingRecord(command="written by tests.echo_family", data={}, metrics={"shift": float(shift)})
    save_checkpoint(path, EchoConfig(), {"shift": torch.tensor(shift)}, record)


def echo(prompt: bytes, shift: int, count: int) -> bytes:
    """What the family generates: the prompt (or a zero byte), shifted, over and over."""
    source = prompt or b"\0"
    return bytes((source[i % len(source)] + shift) % 256 for i in range(count))
