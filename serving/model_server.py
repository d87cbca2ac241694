"""The model deployment class: one engine per replica, loaded from a checkpoint.

``serving.app`` makes it a Ray Serve deployment per model. A family whose
services call more than generation, scoring and listing names a subclass of
``ModelServer`` with those methods in ``Family.deployment``.

Generation requests are handed to the engine's continuous-batching
scheduler, which runs on its own thread; events come back to the replica's
event loop as they are produced. When a caller goes away (a cancelled
stream, a deadline), the request is cancelled and its cache slot is freed at
the scheduler's next step; the client's deadline also travels with the
request, so the scheduler ends it on time by itself. Scoring runs on a worker
thread.

Ray Serve calls ``check_health`` every few seconds: it fails when the
scheduler thread has stopped or a step has stalled, and Ray Serve then
replaces the replica. ``reconfigure`` receives the drain: new requests are
refused from then on, and whatever still runs at the drain's deadline ends
with UNAVAILABLE. The load gauges are refreshed every half second, so they
are never stale.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import torch

from patchwork.engines.api import EngineUnavailable, Generation, ModelInfo, PatchedOutput, SamplingParams
from patchwork.engines.loading import load
from patchwork.serving.metrics import model_metrics

GAUGE_INTERVAL_S = 0.5


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def monotonic_deadline(deadline: float | None) -> float | None:
    """A Unix-time deadline as a time.monotonic() instant."""
    return None if deadline is None else time.monotonic() + (deadline - time.time())


class ModelServer:
    def __init__(self, checkpoint: str, device: str = "auto", threads: int = 1, scheduler: dict | None = None,
                 families: dict[str, str] | None = None):
        from patchwork.engines.registry import register
        from patchwork.engines.scheduler import SchedulerConfig

        register(families or {})
        torch.set_num_threads(max(1, threads))
        self.engine = load(
            checkpoint, device=pick_device(device), scheduler=SchedulerConfig(**(scheduler or {}))
        )
        # The worker (scoring, a family's after-generation work) keeps to the
        # replica's threads too: a new thread would take OpenMP's default,
        # which Ray sets from the whole actor's CPUs (every model's, for the
        # gateway's replica), more threads than the machine has to spare.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score",
                                         initializer=torch.set_num_threads, initargs=(max(1, threads),))
        self.metrics = model_metrics()
        self.tags = {"model": self.engine.name}
        self.draining = False
        self._drain_timer: asyncio.TimerHandle | None = None
        self._gauges: asyncio.Task | None = None
        self.closed = False

    # -- Ray Serve hooks --------------------------------------------------

    def problem(self) -> str | None:
        """Why the engine cannot serve now (None when it can), from its
        scheduler's heartbeat; never calls the model."""
        return self.engine.stats().health

    def check_health(self) -> None:
        """Raises when the scheduler cannot serve (Ray Serve replaces the replica)."""
        reason = self.problem()
        if reason is not None:
            raise RuntimeError(reason)

    async def reconfigure(self, config: dict) -> None:
        """Ray Serve's user_config: ``draining_until`` (a Unix time) starts a
        drain that ends what still runs at that time; None serves again."""
        self._start_gauges()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        until = config.get("draining_until")
        self.draining = until is not None
        if self.draining:
            stopped = EngineUnavailable("the server stopped before this request finished")
            self._drain_timer = asyncio.get_running_loop().call_later(
                max(0.0, until - time.time()), self.engine.abort_all, stopped
            )

    def close(self) -> None:
        """Stops the load gauges and the engine (the replica is stopping); once."""
        if getattr(self, "closed", True):  # closed already, or loading failed
            return
        self.closed = True
        gauges = self._gauges
        if gauges is not None and not gauges.get_loop().is_closed():
            gauges.get_loop().call_soon_threadsafe(gauges.cancel)
        self.engine.close()

    def __del__(self) -> None:
        self.close()

    def _refuse_while_draining(self) -> None:
        if self.draining:
            raise EngineUnavailable("the server is shutting down")

    # -- load gauges ------------------------------------------------------

    def _start_gauges(self) -> None:
        if self._gauges is None:
            self._gauges = asyncio.get_running_loop().create_task(self._refresh_gauges())

    async def _refresh_gauges(self) -> None:
        while True:
            self._record_load()
            await asyncio.sleep(GAUGE_INTERVAL_S)

    def _record_load(self) -> None:
        stats = self.engine.stats()
        self.metrics["batch_size"].set(stats.running, tags=self.tags)
        self.metrics["queue_depth"].set(stats.waiting, tags=self.tags)
        self.metrics["cache_bytes"].set(stats.cache_bytes, tags=self.tags)

    # -- requests ---------------------------------------------------------

    async def _events(self, prompt: bytes, params: SamplingParams, deadline: float | None):
        """Output bytes, then the Generation, from the engine's scheduler thread.
        ``deadline`` is the client's, as a Unix time."""
        self._start_gauges()
        self._refuse_while_draining()
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        until = monotonic_deadline(deadline)
        request = self.engine.submit(
            prompt, params, emit=lambda item: loop.call_soon_threadsafe(items.put_nowait, item),
            deadline=until,
        )
        self._record_load()
        submitted = last = time.perf_counter()
        try:
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                now = time.perf_counter()
                if isinstance(item, Generation):
                    self._record_result(item)
                elif last == submitted:
                    self.metrics["ttfb"].observe(now - submitted, tags=self.tags)
                else:
                    self.metrics["inter_byte"].observe((now - last) / len(item), tags=self.tags)
                last = now
                yield item
                if isinstance(item, Generation):
                    return
        finally:
            request.cancel()  # frees the slot if the caller left early; no-op once finished
            self._record_load()

    def _record_result(self, result: Generation) -> None:
        if result.text:  # counters only take positive increments
            self.metrics["generated"].inc(len(result.text), tags=self.tags)
        if isinstance(result.details, PatchedOutput):
            for length in result.details.patch_lengths:
                self.metrics["patch_length"].observe(length, tags=self.tags)

    async def generate(self, prompt: bytes, params: SamplingParams, deadline: float | None = None) -> Generation:
        async for item in self._events(prompt, params, deadline):
            if isinstance(item, Generation):
                return item

    async def generate_stream(self, prompt: bytes, params: SamplingParams, deadline: float | None = None):
        """Yields output bytes as they are released, then the Generation (the end of the stream)."""
        async for item in self._events(prompt, params, deadline):
            yield item

    async def score(self, text: bytes):
        """The family's score of ``text`` (a dataclass it defines)."""
        self._refuse_while_draining()
        return await asyncio.get_running_loop().run_in_executor(self.worker, self.engine.score, text)

    def describe(self) -> ModelInfo:
        return self.engine.describe()

    def stats(self) -> dict:
        """The engine's stats and this replica's process id."""
        return {**asdict(self.engine.stats()), "pid": os.getpid()}
