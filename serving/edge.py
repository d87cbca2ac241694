"""Patchwork's edge: what runs around each RPC in the gRPC server that took it.

Two servers take Patchwork's RPCs: each gateway replica's own (Ray Serve's
direct ingress, the default) and Ray Serve's proxy, which turns every RPC into
a call to the gateway deployment. Both build their method handlers the same
way, from the functions ``serving.grpc_services`` names, so that in either the
handler for each method is wrapped by ``EdgeHandlers``, which adds:

- Cancellation that always reaches the model. The proxy passes a client's
  cancellation (or passed deadline) on only when it arrives while the proxy
  awaits the next item of a stream; when it arrives while the proxy is writing
  an item to the client, the proxy's generator is abandoned where it yielded
  and the gateway and model keep generating for nobody (measured: 6-9 of 32
  cancelled streams ran on for hundreds of steps). Here the proxy's generator
  runs in a task of its own that only ever waits for the next item, and the
  RPC's end cancels that task, which cancels the call to the gateway.
- The client's deadline, passed on as ``x-patchwork-deadline`` metadata (a
  Unix time), so the engine stops the work when it passes even on its own.
- A request id for every call (the client's ``request_id`` metadata, or a new
  one), which Ray Serve uses in its logs and which INTERNAL errors quote.
- Request counts and latencies by the status code the client saw, including
  CANCELLED and DEADLINE_EXCEEDED.
- INTERNAL errors with a short message and the request id; the details go to
  the proxy's log.
- UNAVAILABLE instead of the proxy's NOT_FOUND when no application serves the
  method (while the server starts or stops): retry, rather than give up.

After an RPC has ended, the proxy's own code may still run in the background
task; the context it holds then answers from what was read while the RPC was
live and ignores writes, since the RPC's own context is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

import grpc

logger = logging.getLogger("ray.serve")

DEADLINE_KEY = "x-patchwork-deadline"
REQUEST_ID_KEY = "request_id"
# The client's deadline passes before the server's (the request took a while
# to arrive), so the client's cancellation at its deadline reaches the server
# a little early: one that arrives this close to the deadline is the deadline.
DEADLINE_SLACK_S = 0.25
_END = object()


class _LiveContext:
    """The proxy's view of an RPC's context: the real one while the RPC is
    live, inert once it has ended."""

    _ENDED_ANSWERS = {"code": None, "details": "", "auth_context": {}, "peer_identities": None,
                      "peer_identity_key": None, "trailing_metadata": (), "time_remaining": 0.0}

    def __init__(self, context, metadata: tuple):
        self._context = context
        self._metadata = metadata
        self._peer = context.peer()
        self.ended = False

    def invocation_metadata(self):
        return self._metadata

    def peer(self):
        return self._peer

    def __getattr__(self, name: str):
        if not self.ended:
            return getattr(self._context, name)
        if name in self._ENDED_ANSWERS:
            answer = self._ENDED_ANSWERS[name]
            return lambda *args, **kwargs: answer
        if name.startswith("set_") or name in ("abort", "send_initial_metadata", "add_done_callback"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class _Call:
    """One RPC as the edge sees it: its id, deadline, metrics and status."""

    def __init__(self, method: str, context):
        self.method = method.rsplit("/", 1)[-1]
        self.context = context
        self.started = time.perf_counter()
        metadata = tuple(context.invocation_metadata() or ())
        supplied = [value for key, value in metadata if key == REQUEST_ID_KEY]
        self.request_id = supplied[0] if supplied else uuid.uuid4().hex
        extra = () if supplied else ((REQUEST_ID_KEY, self.request_id),)
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.time() + remaining  # a Unix time
        if self.deadline is not None:
            extra += ((DEADLINE_KEY, repr(self.deadline)),)
        self.proxy_context = _LiveContext(context, metadata + extra)

    def end(self) -> None:
        """The RPC is over: the proxy's context goes inert."""
        self.proxy_context.ended = True

    def status_on_cancel(self) -> grpc.StatusCode:
        """What the client saw when the RPC ended early: its deadline passed, or
        it cancelled (decided without the RPC's context, which may be gone)."""
        if self.deadline is not None and time.time() >= self.deadline - DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    def finish(self, code: grpc.StatusCode | None) -> None:
        """Records the call; rewrites details that must not reach the client.
        Runs while the RPC is live, except after a cancellation (when it
        touches nothing but the metrics)."""
        code = code or grpc.StatusCode.OK
        if code == grpc.StatusCode.CANCELLED:
            code = self.status_on_cancel()
        elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            details = self.context.details()
            if not _is_short_message(details, self.request_id):
                logger.error("request %s (%s) failed: %s", self.request_id, self.method, details)
                self.context.set_code(grpc.StatusCode.INTERNAL)
                self.context.set_details(f"internal error (request id {self.request_id})")
                code = grpc.StatusCode.INTERNAL
        elif code == grpc.StatusCode.NOT_FOUND and self.method != "Check":
            self.context.set_code(grpc.StatusCode.UNAVAILABLE)
            self.context.set_details("no application serves this method right now (starting or stopping); retry")
            code = grpc.StatusCode.UNAVAILABLE
        _record(self.method, code.name, time.perf_counter() - self.started)


def _is_short_message(details, request_id: str) -> bool:
    """A message Patchwork wrote for clients (it quotes the request id)."""
    text = details.decode() if isinstance(details, bytes) else str(details or "")
    return request_id in text and "\n" not in text and len(text) < 200


class EdgeHandlers:
    """Wraps the proxy's handler factory (``server.service_handler_factory``)."""

    def __init__(self, factory: Callable):
        self.factory = factory

    def __call__(self, service_method: str, streaming_type):
        handler = self.factory(service_method=service_method, streaming_type=streaming_type)
        if streaming_type.name == "UNARY_UNARY":
            return self._unary(service_method, handler)
        if streaming_type.name == "UNARY_STREAM":
            return self._stream(service_method, handler)
        return handler  # Patchwork has no client-streaming methods

    @staticmethod
    def _unary(service_method: str, handler):
        async def unary_unary(request, context):
            call = _Call(service_method, context)
            code = None
            try:
                response = await handler(request, call.proxy_context)
                code = context.code()
                return response
            except asyncio.CancelledError:
                code = call.status_on_cancel()
                raise
            finally:
                call.end()
                call.finish(code)

        return unary_unary

    @staticmethod
    def _stream(service_method: str, handler):
        async def unary_stream(request, context):
            call = _Call(service_method, context)
            items: asyncio.Queue = asyncio.Queue()

            async def pump():
                # Never waits on anything but the proxy's next item, so a
                # cancellation always lands where the proxy handles it.
                try:
                    async for message in handler(request, call.proxy_context):
                        items.put_nowait(message)
                finally:
                    items.put_nowait(_END)

            task = asyncio.get_running_loop().create_task(pump())
            context.add_done_callback(lambda _: (call.end(), task.cancel()))
            code = None
            try:
                while (item := await items.get()) is not _END:
                    yield item
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()
                code = context.code()
            except (asyncio.CancelledError, GeneratorExit):
                code = call.status_on_cancel()
                raise
            finally:
                call.end()
                task.cancel()
                call.finish(code)

        return unary_stream


def install(server) -> None:
    """Wraps the proxy's handlers of every service registered after this call (idempotent)."""
    if not isinstance(server.service_handler_factory, EdgeHandlers):
        server.service_handler_factory = EdgeHandlers(server.service_handler_factory)


def _record(method: str, code: str, seconds: float) -> None:
    from patchwork.serving.metrics import edge_metrics

    recorded, tags = edge_metrics(), {"method": method, "code": code}
    recorded["requests"].inc(tags=tags)
    recorded["latency"].observe(seconds, tags=tags)
