"""The contract between a model family's engine, the scheduler and serving.

Every family's engine keeps the ``Engine`` protocol: it describes itself,
reports its load and health, and closes. A family that generates also keeps
``GenerativeEngine``: ``submit`` starts a request on the engine's
continuous-batching scheduler, which delivers the output as ``bytes``
deltas and then one ``Generation``, the end of the stream. A
family that does not generate (an encoder) keeps only ``Engine`` and offers
its own methods beside it. A prompt is raw bytes or a sequence of typed
``Segment``s (text, image, audio); a family refuses a modality it does not
read with ``InvalidRequest`` naming ``prompt``.

The types here are what crosses from a model replica to the gateway: typed
dataclasses, never dicts keyed by strings. What is particular to one family
travels in ``Generation.details``, a type the family defines (BLT's patches
and global steps are ``engines.blt.reference.BltDetails``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    END_OF_SEQUENCE = "end_of_sequence"


class Modality(str, enum.Enum):
    TEXT = "text"
    IMAGE = "image"
    AUDIO = "audio"


@dataclass(frozen=True)
class Segment:
    """One piece of a multimodal prompt: text as its bytes, an image or an
    audio clip as its encoded file (PNG, JPEG, WAV...)."""

    modality: Modality
    data: bytes


# A prompt: raw bytes (text), or typed segments in order.
Prompt = bytes | tuple[Segment, ...]


def text_of(prompt: Prompt, family: str) -> bytes:
    """The bytes of a prompt that holds text only, for the families that read
    nothing else; InvalidRequest naming ``prompt`` otherwise."""
    if isinstance(prompt, bytes):
        return prompt
    other = sorted({segment.modality.value for segment in prompt} - {Modality.TEXT.value})
    if other:
        raise InvalidRequest("prompt", f"family {family} reads text only, not {', '.join(other)}")
    return b"".join(segment.data for segment in prompt)


class SamplingParams(BaseModel):
    """One request's decoding settings, validated once at the edge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Output bytes to generate at most.
    max_new_bytes: int = Field(default=256, ge=0)
    # 0 is greedy decoding.
    temperature: float = Field(default=0.0, ge=0.0, allow_inf_nan=False)
    # Nucleus mass; 0 and 1 both turn nucleus sampling off.
    top_p: float = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    # 0 turns top-k off.
    top_k: int = Field(default=0, ge=0)
    seed: int = Field(default=0, ge=0, lt=2**64)
    stop: tuple[bytes, ...] = ()

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stops: tuple[bytes, ...]) -> tuple[bytes, ...]:
        if any(len(s) == 0 for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


@dataclass(frozen=True)
class Usage:
    """Counts every generating family has. A token is the family's unit of
    input and output: a byte for byte-level families such as BLT."""

    prompt_tokens: int
    generated_tokens: int


@dataclass
class Generation:
    """The result of one request, and the last item of its stream."""

    text: bytes
    finish_reason: FinishReason
    usage: Usage
    # The family's own facts about the result (a dataclass it defines), or None.
    details: Any = None


@runtime_checkable
class PatchedOutput(Protocol):
    """``Generation.details`` of a family that cuts its output into patches
    (BLT): what fills ByteLM's ``patch_lengths`` and ``usage.patches`` /
    ``usage.global_steps``, and the patch-length metric. Other families leave
    those empty."""

    patch_lengths: list[int]  # they sum to len(text)
    global_steps: int  # times the patch-level model ran for the sequence


@dataclass(frozen=True)
class ModelInfo:
    """What a model says about itself, for listings."""

    name: str
    family: str
    config: dict
    metrics: dict[str, float] = field(default_factory=dict)
    # What a request gets for the settings it leaves unset (family-specific; {} for none).
    defaults: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EngineStats:
    """An engine's load and health now."""

    running: int  # requests holding a cache slot
    waiting: int  # requests queued for one
    steps: int  # scheduler steps so far
    cache_bytes: int  # cache memory the running requests take
    health: str | None  # None when the engine can serve, else why not


# -- errors every engine raises (the gateway maps each to one gRPC status) ----


class AdmissionError(Exception):
    """A request refused for now (the queue is full): retry later (gRPC RESOURCE_EXHAUSTED)."""


class InvalidRequest(ValueError):
    """A request the model cannot take as it is (gRPC INVALID_ARGUMENT); ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message)  # the arguments, so it survives pickling between processes
        self.field, self.message = field, message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class RequestTooLarge(InvalidRequest):
    """A request that can never fit a cache slot."""


class EngineUnavailable(Exception):
    """The engine cannot serve: its scheduler stopped or is shutting down (gRPC UNAVAILABLE)."""


class RequestCancelled(Exception):
    """Delivered to a request that was cancelled before it finished."""


class DeadlineExceeded(Exception):
    """Delivered to a request whose deadline passed before it finished."""


# -- engines ------------------------------------------------------------------


@runtime_checkable
class Engine(Protocol):
    """What serving needs from every family's engine."""

    family: str
    name: str

    def describe(self) -> ModelInfo: ...

    def stats(self) -> EngineStats: ...

    def abort_all(self, reason: BaseException) -> int:
        """Ends every request in flight with ``reason`` (a drain's deadline);
        returns how many there were."""

    def close(self) -> None:
        """Stops the engine's threads; requests still running fail with EngineUnavailable."""


class RequestHandle(Protocol):
    """A submitted generation (``engines.scheduler.Request``)."""

    def cancel(self, reason: BaseException | None = None) -> None: ...


@runtime_checkable
class GenerativeEngine(Engine, Protocol):
    def submit(
        self, prompt: Prompt, params: SamplingParams, emit: Callable[[bytes | Generation | BaseException], None],
        deadline: float | None = None,
    ) -> RequestHandle:
        """Starts a generation. ``emit`` receives released output bytes
        (stop sequences held back), then the ``Generation`` or the exception
        that ended the request, from the scheduler's thread. ``deadline`` is a ``time.monotonic()`` instant.
        Raises InvalidRequest (a prompt of a modality the family does not
        read, a request that can never fit), AdmissionError or
        EngineUnavailable at once."""
