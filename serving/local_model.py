"""A model the gateway replica runs itself, called like its deployment.

When the gateway runs a model in its own process (``ServingConfig.gateway_models``),
the handlers reach it through ``LocalModel``, which offers the part of Ray
Serve's ``DeploymentHandle`` they use: ``handle.method.remote(...)`` to await a
result and ``handle.options(stream=True).method.remote(...)`` to iterate a
stream. A call is a plain coroutine (or async generator) on the gateway's
event loop, with no Ray hop; cancelling the caller's task cancels it, as a
handle's response is cancelled, so the request's slot is freed the same way.
"""

from __future__ import annotations

import inspect
from typing import Any

from patchwork.serving.grpc_services import load_object


class LocalModel:
    def __init__(self, server: Any, stream: bool = False):
        self.server, self.stream = server, stream

    def options(self, stream: bool = False) -> "LocalModel":
        return LocalModel(self.server, stream)

    def __getattr__(self, method: str) -> "_LocalMethod":
        return _LocalMethod(getattr(self.server, method), self.stream)


class _LocalMethod:
    def __init__(self, method, stream: bool):
        self.method, self.stream = method, stream

    def remote(self, *args, **kwargs):
        if self.stream:
            return self.method(*args, **kwargs)  # an async generator
        return _awaited(self.method, args, kwargs)


async def _awaited(method, args, kwargs):
    result = method(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result


def start_local_model(spec: dict) -> LocalModel:
    """Loads a model into this process from the arguments its deployment
    would be bound with (``serving.app.model_args``)."""
    server_type = load_object(spec["deployment"])
    return LocalModel(server_type(*spec["args"]))
