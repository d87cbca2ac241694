from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_END_OF_SEQUENCE: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_END_OF_SEQUENCE: FinishReason

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_bytes", "temperature", "top_p", "top_k", "seed", "stop", "model")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_BYTES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt: bytes
    max_new_bytes: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[bytes]
    model: str
    def __init__(self, prompt: _Optional[bytes] = ..., max_new_bytes: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[bytes]] = ..., model: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_bytes", "generated_bytes", "patches", "global_steps")
    PROMPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    GENERATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PATCHES_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    prompt_bytes: int
    generated_bytes: int
    patches: int
    global_steps: int
    def __init__(self, prompt_bytes: _Optional[int] = ..., generated_bytes: _Optional[int] = ..., patches: _Optional[int] = ..., global_steps: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "patch_lengths", "usage", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PATCH_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: bytes
    finish_reason: FinishReason
    patch_lengths: _containers.RepeatedScalarFieldContainer[int]
    usage: Usage
    model: str
    def __init__(self, text: _Optional[bytes] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., patch_lengths: _Optional[_Iterable[int]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class GenerateStreamChunk(_message.Message):
    __slots__ = ("text", "finish_reason", "patch_lengths", "usage", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PATCH_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: bytes
    finish_reason: FinishReason
    patch_lengths: _containers.RepeatedScalarFieldContainer[int]
    usage: Usage
    model: str
    def __init__(self, text: _Optional[bytes] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., patch_lengths: _Optional[_Iterable[int]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("text", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: bytes
    model: str
    def __init__(self, text: _Optional[bytes] = ..., model: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("entropies", "patch_lengths", "bits_per_byte", "model")
    ENTROPIES_FIELD_NUMBER: _ClassVar[int]
    PATCH_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_BYTE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    entropies: _containers.RepeatedScalarFieldContainer[float]
    patch_lengths: _containers.RepeatedScalarFieldContainer[int]
    bits_per_byte: float
    model: str
    def __init__(self, entropies: _Optional[_Iterable[float]] = ..., patch_lengths: _Optional[_Iterable[int]] = ..., bits_per_byte: _Optional[float] = ..., model: _Optional[str] = ...) -> None: ...
