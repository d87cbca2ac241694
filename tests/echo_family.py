"""A throwaway model family that keeps the engine contract with nothing but
the public pieces: it echoes its prompt back, each byte shifted by the one
weight it has. Registered through ``engines.registry.register``, written as
an ordinary checkpoint, and served beside BLT by the same application."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from engines.api import EngineStats, FinishReason, Generation, ModelInfo, SamplingParams, Usage
from engines.checkpoint import Manifest, TrainingRecord, save_checkpoint
from engines.registry import Family
from engines.scheduler import Scheduler, SchedulerConfig

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

    def submit(self, prompt: bytes, params: SamplingParams, emit=None, deadline: float | None = None):
        return self.scheduler.submit(prompt, params, emit, deadline)

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

    def new_state(self, caches: torch.Tensor, prompt: list[int]) -> bytes:
        return bytes(prompt[1:]) or b"\0"  # what the sequence echoes

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

    def choose(self, decoding, logits: torch.Tensor) -> tuple[int, bytes]:
        symbol = decoding.choose(logits)
        return symbol, decoding.accept(bytes([symbol]))

    def result(self, prompt: bytes, decoding, state) -> Generation:
        text = decoding.stop.text
        return Generation(text=text, finish_reason=decoding.finish_reason or FinishReason.LENGTH,
                          usage=Usage(prompt_tokens=len(prompt), generated_tokens=len(text)))


def build_engine(config: EchoConfig, weights: dict[str, torch.Tensor], *, device, dtype, name: str,
                 manifest: Manifest | None = None, scheduler: SchedulerConfig | None = None) -> EchoEngine:
    return EchoEngine(int(weights["shift"]), name, manifest, scheduler)


FAMILY = Family(name="echo", config_type=EchoConfig, format_version=1, build_engine=build_engine)


def write_checkpoint(path, shift: int) -> None:
    record = TrainingRecord(command="written by tests.echo_family", data={}, metrics={"shift": float(shift)})
    save_checkpoint(path, EchoConfig(), {"shift": torch.tensor(shift)}, record)


def echo(prompt: bytes, shift: int, count: int) -> bytes:
    """What the family generates: the prompt (or a zero byte), shifted, over and over."""
    source = prompt or b"\0"
    return bytes((source[i % len(source)] + shift) % 256 for i in range(count))
