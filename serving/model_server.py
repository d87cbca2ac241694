"""The model deployment: one engine per replica, loaded from a checkpoint.

Requests run on one worker thread, in arrival order, so the replica's event
loop stays free for health checks, new arrivals and cancellations. A stream
whose caller goes away is cancelled before its next byte.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import torch
from ray import serve

import engines
from engines.generation import Generation, SamplingParams

_DONE = object()


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
    def __init__(self, checkpoint: str, device: str = "auto", threads: int = 1):
        torch.set_num_threads(max(1, threads))
        self.engine = engines.load(checkpoint, device=pick_device(device))
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def generate(self, prompt: bytes, params: dict) -> dict:
        result = await self._run(self.engine.generate_one, prompt, SamplingParams(**params))
        return generation_dict(result)

    async def generate_stream(self, prompt: bytes, params: dict):
        """Yields {"text": delta} items, then the final generation dict."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        sampling = SamplingParams(**params)

        def produce():
            try:
                for item in self.engine.stream(prompt, sampling, cancelled.is_set):
                    loop.call_soon_threadsafe(items.put_nowait, item)
            finally:
                loop.call_soon_threadsafe(items.put_nowait, _DONE)

        work = loop.run_in_executor(self.worker, produce)
        try:
            while (item := await items.get()) is not _DONE:
                yield generation_dict(item) if isinstance(item, Generation) else {"text": item}
        finally:
            cancelled.set()
        await work  # re-raises an engine failure

    async def score(self, text: bytes) -> dict:
        return asdict(await self._run(self.engine.score, text))

    def describe(self) -> dict:
        return self.engine.describe()
