"""Dynamic batching for families that answer a request with one forward pass
(encoders): requests that arrive close together share one pass.

A worker thread takes the waiting requests in arrival order, up to
``max_batch`` at a time; once the oldest has waited ``max_wait_s`` it runs
whatever is there rather than wait for more, so a lone request pays at most
that much, and under load every pass is full. At most ``max_queue`` requests
wait (AdmissionError beyond). A request cancelled or past its deadline
before its batch starts is dropped from it. An error in a batch fails that
batch's requests and nothing else; the thread goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from patchwork.engines.api import AdmissionError, DeadlineExceeded, EngineUnavailable

logger = logging.getLogger(__name__)


@dataclass
class _Waiting:
    item: Any
    deadline: float | None  # a time.monotonic() instant
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """Runs ``run_batch(items) -> results`` (one result per item, in order) on batches of submitted items."""

    def __init__(self, run_batch: Callable[[list], list], *, max_batch: int, max_wait_s: float, max_queue: int,
                 stall_timeout_s: float, name: str):
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.stall_timeout_s = stall_timeout_s
        self.batches = 0  # batches run so far
        self.running = 0  # items in the batch running now
        self._waiting: deque[_Waiting] = deque()
        self._changed = threading.Condition()
        self._closed = False
        self._batch_started: float | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any, deadline: float | None = None) -> Future:
        """Queues ``item``; the future receives its result or the error that ended it."""
        with self._changed:
            if self._closed or not self._thread.is_alive():
                raise EngineUnavailable("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise AdmissionError(f"{len(self._waiting)} requests are waiting; retry later")
            waiting = _Waiting(item, deadline)
            self._waiting.append(waiting)
            self._changed.notify()
        return waiting.future

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def health(self) -> str | None:
        """None when batches run, else why not."""
        if not self._thread.is_alive():
            return "the batching thread stopped"
        started = self._batch_started
        if started is not None and time.monotonic() - started > self.stall_timeout_s:
            return f"a batch has run for over {self.stall_timeout_s:.0f} s"
        return None

    def abort_all(self, reason: BaseException) -> int:
        """Ends every waiting request with ``reason``; returns how many there were."""
        with self._changed:
            dropped = list(self._waiting)
            self._waiting.clear()
        for waiting in dropped:
            if waiting.future.set_running_or_notify_cancel():
                waiting.future.set_exception(reason)
        return len(dropped)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._thread.join(timeout=5)
        self.abort_all(EngineUnavailable("the engine stopped before this request finished"))

    # -- the worker thread ----------------------------------------------------

    def _next_batch(self) -> list[_Waiting] | None:
        with self._changed:
            while not self._waiting and not self._closed:
                self._changed.wait()
            while len(self._waiting) < self.max_batch and not self._closed:
                left = self._waiting[0].arrived + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            if self._closed:
                return None
            return [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            now = time.monotonic()
            live = []
            for waiting in batch:
                if not waiting.future.set_running_or_notify_cancel():
                    continue  # cancelled while it waited
                if waiting.deadline is not None and now > waiting.deadline:
                    waiting.future.set_exception(DeadlineExceeded())
                    continue
                live.append(waiting)
            if not live:
                continue
            self.running, self._batch_started = len(live), now
            try:
                results = self.run_batch([waiting.item for waiting in live])
            except Exception as e:
                logger.exception("a batch of %d failed", len(live))
                for waiting in live:
                    waiting.future.set_exception(e)
            else:
                for waiting, result in zip(live, results, strict=True):
                    waiting.future.set_result(result)
            finally:
                self.batches += 1
                self.running, self._batch_started = 0, None
