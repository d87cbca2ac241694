from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Array(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class Clip(_message.Message):
    __slots__ = ("wav", "frames", "audio", "sample_rate", "video")
    WAV_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    wav: bytes
    frames: _containers.RepeatedScalarFieldContainer[bytes]
    audio: Array
    sample_rate: int
    video: Array
    def __init__(self, wav: _Optional[bytes] = ..., frames: _Optional[_Iterable[bytes]] = ..., audio: _Optional[_Union[Array, _Mapping]] = ..., sample_rate: _Optional[int] = ..., video: _Optional[_Union[Array, _Mapping]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("clip", "model")
    CLIP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    clip: Clip
    model: str
    def __init__(self, clip: _Optional[_Union[Clip, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("audio", "video", "fused", "model", "shared_audio", "shared_video", "windows")
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    FUSED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHARED_AUDIO_FIELD_NUMBER: _ClassVar[int]
    SHARED_VIDEO_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    audio: _containers.RepeatedScalarFieldContainer[float]
    video: _containers.RepeatedScalarFieldContainer[float]
    fused: _containers.RepeatedScalarFieldContainer[float]
    model: str
    shared_audio: _containers.RepeatedScalarFieldContainer[float]
    shared_video: _containers.RepeatedScalarFieldContainer[float]
    windows: int
    def __init__(self, audio: _Optional[_Iterable[float]] = ..., video: _Optional[_Iterable[float]] = ..., fused: _Optional[_Iterable[float]] = ..., model: _Optional[str] = ..., shared_audio: _Optional[_Iterable[float]] = ..., shared_video: _Optional[_Iterable[float]] = ..., windows: _Optional[int] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("clip", "top_k", "model")
    CLIP_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    clip: Clip
    top_k: int
    model: str
    def __init__(self, clip: _Optional[_Union[Clip, _Mapping]] = ..., top_k: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("name", "score")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    name: str
    score: float
    def __init__(self, name: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("labels", "head", "model", "windows")
    LABELS_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    head: str
    model: str
    windows: int
    def __init__(self, labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., head: _Optional[str] = ..., model: _Optional[str] = ..., windows: _Optional[int] = ...) -> None: ...

class RetrieveRequest(_message.Message):
    __slots__ = ("query", "index", "top_k", "model")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    query: Clip
    index: str
    top_k: int
    model: str
    def __init__(self, query: _Optional[_Union[Clip, _Mapping]] = ..., index: _Optional[str] = ..., top_k: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class Match(_message.Message):
    __slots__ = ("id", "score")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("matches", "searched", "model", "windows")
    MATCHES_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    matches: _containers.RepeatedCompositeFieldContainer[Match]
    searched: str
    model: str
    windows: int
    def __init__(self, matches: _Optional[_Iterable[_Union[Match, _Mapping]]] = ..., searched: _Optional[str] = ..., model: _Optional[str] = ..., windows: _Optional[int] = ...) -> None: ...
