"""Locust users that speak gRPC: a client interceptor fires one Locust
request event per call, and streaming calls also report time to first byte,
time per output byte and inter-byte latency as entries of their own.

Response times are in milliseconds, as Locust records them; a response's
length is what it produced, in its RPC's unit (``plan.RPCS``): generated
bytes, images, clips...
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User
from locust.exception import LocustError

from patchwork.client import NO_RETRY, Client
from patchwork.loadtests.plan import RPCS, generated_bytes

grpc_gevent.init_gevent()  # gRPC's I/O must cooperate with Locust's gevent loop

TTFB = " time to first byte"
TIME_PER_BYTE = " time per output byte"
INTER_BYTE = " inter-byte latency"


def _outputs(method: str, response) -> int:
    """What a response of ``method`` (/package.Service/Rpc) produced, in its RPC's unit."""
    rpc = RPCS.get(method.rpartition("/")[2])
    return 0 if rpc is None else rpc.outputs(response)


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, environment):
        self.events = environment.events

    def _fire(self, name: str, milliseconds: float, length: int = 0, exception: Exception | None = None):
        self.events.request.fire(request_type="grpc", name=name, response_time=milliseconds,
                                 response_length=length, exception=exception, context={})

    def intercept_unary_unary(self, continuation, details, request):
        start = time.perf_counter()
        call = continuation(details, request)
        try:
            length = _outputs(details.method, call.result())
            error = None
        except grpc.RpcError as e:
            length, error = 0, e
        self._fire(details.method, (time.perf_counter() - start) * 1000, length, error)
        return call

    def intercept_unary_stream(self, continuation, details, request):
        start = time.perf_counter()
        call = continuation(details, request)
        return _ObservedStream(call, self._observe_stream(details.method, start, call))

    def _observe_stream(self, name: str, start: float, call):
        first = last = None
        generated = 0
        try:
            for chunk in call:
                now = time.perf_counter()
                if chunk.text:
                    if first is None:
                        first = now
                        self._fire(name + TTFB, (now - start) * 1000)
                    else:
                        self._fire(name + INTER_BYTE, (now - last) * 1000 / len(chunk.text))
                    last = now
                generated = generated_bytes(chunk) if chunk.finish_reason else generated + len(chunk.text)
                yield chunk
        except grpc.RpcError as e:
            self._fire(name, (time.perf_counter() - start) * 1000, generated, e)
            raise
        end = time.perf_counter()
        if first is not None and generated > 1:
            self._fire(name + TIME_PER_BYTE, (end - first) * 1000 / (generated - 1))
        self._fire(name, (end - start) * 1000, generated)


class _ObservedStream:
    """A streaming call whose messages pass through the interceptor's timing;
    everything else (``cancel``, ``code``...) is the call's own."""

    def __init__(self, call, chunks: Iterator):
        self._call, self._chunks = call, chunks

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._chunks)

    def __getattr__(self, name: str):
        return getattr(self._call, name)


class GrpcUser(User):
    """A user with a ``patchwork.Client`` of ``host`` (``self.client``) whose
    calls all report to Locust. It never retries: a refused call is a result."""

    abstract = True
    token: str | None = None

    def __init__(self, environment):
        super().__init__(environment)
        if not self.host:
            raise LocustError("set the target with --host HOST:PORT")
        self.client = Client(self.host, token=self.token, retry=NO_RETRY, interceptors=[LocustInterceptor(environment)])

    def on_stop(self):
        self.client.close()
