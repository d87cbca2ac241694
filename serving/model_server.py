"""The model deployment: one engine per replica, loaded from a checkpoint.

Generation requests are handed to the engine's continuous-batching
scheduler, which runs on its own thread; events come back to the replica's
event loop as they are produced. When a caller goes away (a cancelled
stream, a deadline), the request is cancelled and its cache slot is freed at
the scheduler's next step. Scoring runs on a worker thread.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import torch
from ray import serve

import engines
from engines.generation import Generation, SamplingParams


def generation_dict(result: Generation) -> dict:
    out = asdict(result)
    out["finish_reason"] = result.finish_reason.value
    out["generated_bytes"] = len(result.text)
    return out


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


@serve.deployment
class ModelServer:
    def __init__(self, checkpoint: str, device: str = "auto", threads: int = 1, scheduler: dict | None = None):
        from engines.scheduler import SchedulerConfig

        torch.set_num_threads(max(1, threads))
        self.engine = engines.load(
            checkpoint, device=pick_device(device), scheduler=SchedulerConfig(**(scheduler or {}))
        )
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")

    async def _events(self, prompt: bytes, params: dict):
        """Byte deltas, then the Generation, from the engine's scheduler thread."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        request = self.engine.submit(
            prompt, SamplingParams(**params), emit=lambda item: loop.call_soon_threadsafe(items.put_nowait, item)
        )
        try:
            while True:
                item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Generation):
                    return
        finally:
            request.cancel()  # frees the slot if the caller left early; no-op once finished

    async def generate(self, prompt: bytes, params: dict) -> dict:
        async for item in self._events(prompt, params):
            if isinstance(item, Generation):
                return generation_dict(item)

    async def generate_stream(self, prompt: bytes, params: dict):
        """Yields {"text": delta} items, then the final generation dict."""
        async for item in self._events(prompt, params):
            yield generation_dict(item) if isinstance(item, Generation) else {"text": item}

    async def score(self, text: bytes) -> dict:
        result = await asyncio.get_running_loop().run_in_executor(self.worker, self.engine.score, text)
        return asdict(result)

    def describe(self) -> dict:
        return self.engine.describe()

    def stats(self) -> dict:
        """The scheduler's running sequences and waiting requests."""
        scheduler = self.engine.scheduler
        return {"running": scheduler.running, "waiting": scheduler.queue_depth, "steps": scheduler.steps}
