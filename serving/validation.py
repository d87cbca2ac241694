"""Request checks at the gateway: every failure names the offending field."""

from __future__ import annotations

from pydantic import ValidationError

from patchwork.engines.api import SamplingParams
from patchwork.serving.config import Limits


class InvalidArgument(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def resolve_model(name: str, models: list[str], default: str) -> str:
    if not name:
        return default
    if name not in models:
        raise InvalidArgument("model", f"unknown model {name!r}; this server has {sorted(models)}")
    return name


def _check_bytes(field: str, data: bytes, limit: int) -> None:
    if len(data) > limit:
        raise InvalidArgument(field, f"{len(data)} bytes is over the limit of {limit}")


def generate_params(request, limits: Limits) -> SamplingParams:
    """GenerateRequest -> SamplingParams, or InvalidArgument."""
    _check_bytes("prompt", request.prompt, limits.max_prompt_bytes)
    if request.max_new_bytes > limits.max_new_bytes:
        raise InvalidArgument("max_new_bytes", f"{request.max_new_bytes} is over the limit of {limits.max_new_bytes}")
    if len(request.stop) > limits.max_stop_sequences:
        raise InvalidArgument("stop", f"{len(request.stop)} stop sequences; at most {limits.max_stop_sequences}")
    for stop in request.stop:
        _check_bytes("stop", stop, limits.max_stop_bytes)
    try:
        return SamplingParams(
            max_new_bytes=request.max_new_bytes or limits.default_new_bytes,
            temperature=request.temperature,
            top_p=request.top_p or 1.0,
            top_k=request.top_k,
            seed=request.seed,
            stop=tuple(request.stop),
        )
    except ValidationError as e:
        error = e.errors()[0]
        raise InvalidArgument(str(error["loc"][0]), error["msg"]) from None


def score_text(request, limits: Limits) -> bytes:
    _check_bytes("text", request.text, limits.max_prompt_bytes)
    return request.text
