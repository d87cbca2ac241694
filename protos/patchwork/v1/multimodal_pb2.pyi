from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Guidance(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUIDANCE_UNSPECIFIED: _ClassVar[Guidance]
    GUIDANCE_NONE: _ClassVar[Guidance]
    GUIDANCE_CLASSIFIER_FREE: _ClassVar[Guidance]
    GUIDANCE_CONTRASTIVE: _ClassVar[Guidance]
    GUIDANCE_MIXED: _ClassVar[Guidance]
GUIDANCE_UNSPECIFIED: Guidance
GUIDANCE_NONE: Guidance
GUIDANCE_CLASSIFIER_FREE: Guidance
GUIDANCE_CONTRASTIVE: Guidance
GUIDANCE_MIXED: Guidance

class Decoding(_message.Message):
    __slots__ = ("guidance", "temperature", "top_p", "top_k", "guidance_scale", "contrastive_alpha", "contrastive_k", "seed")
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    CONTRASTIVE_ALPHA_FIELD_NUMBER: _ClassVar[int]
    CONTRASTIVE_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    guidance: Guidance
    temperature: float
    top_p: float
    top_k: int
    guidance_scale: float
    contrastive_alpha: float
    contrastive_k: int
    seed: int
    def __init__(self, guidance: _Optional[_Union[Guidance, str]] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., contrastive_alpha: _Optional[float] = ..., contrastive_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateImageRequest(_message.Message):
    __slots__ = ("prompt", "samples", "decoding", "documents", "model")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    samples: int
    decoding: Decoding
    documents: int
    model: str
    def __init__(self, prompt: _Optional[str] = ..., samples: _Optional[int] = ..., decoding: _Optional[_Union[Decoding, _Mapping]] = ..., documents: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class GeneratedImage(_message.Message):
    __slots__ = ("png", "guidance", "score")
    PNG_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    guidance: Guidance
    score: float
    def __init__(self, png: _Optional[bytes] = ..., guidance: _Optional[_Union[Guidance, str]] = ..., score: _Optional[float] = ...) -> None: ...

class GenerateImageResponse(_message.Message):
    __slots__ = ("images", "model")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[GeneratedImage]
    model: str
    def __init__(self, images: _Optional[_Iterable[_Union[GeneratedImage, _Mapping]]] = ..., model: _Optional[str] = ...) -> None: ...

class CaptionRequest(_message.Message):
    __slots__ = ("image", "alt_text", "decoding", "documents", "max_new_bytes", "model", "audio")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    ALT_TEXT_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    alt_text: str
    decoding: Decoding
    documents: int
    max_new_bytes: int
    model: str
    audio: bytes
    def __init__(self, image: _Optional[bytes] = ..., alt_text: _Optional[str] = ..., decoding: _Optional[_Union[Decoding, _Mapping]] = ..., documents: _Optional[int] = ..., max_new_bytes: _Optional[int] = ..., model: _Optional[str] = ..., audio: _Optional[bytes] = ...) -> None: ...

class CaptionResponse(_message.Message):
    __slots__ = ("text", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: str
    model: str
    def __init__(self, text: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class InfillRequest(_message.Message):
    __slots__ = ("text", "image", "decoding", "max_new_bytes", "model")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DECODING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    decoding: Decoding
    max_new_bytes: int
    model: str
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ..., decoding: _Optional[_Union[Decoding, _Mapping]] = ..., max_new_bytes: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class InfillResponse(_message.Message):
    __slots__ = ("spans", "model")
    SPANS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    spans: _containers.RepeatedScalarFieldContainer[str]
    model: str
    def __init__(self, spans: _Optional[_Iterable[str]] = ..., model: _Optional[str] = ...) -> None: ...
