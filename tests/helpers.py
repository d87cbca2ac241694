"""Helpers shared by the tests: small random BLT engines, the reference path, polling."""

from __future__ import annotations

import random
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from patchwork.engines.api import Generation, SamplingParams
from patchwork.engines.blt.engine import BltEngine
from patchwork.engines.scheduler import SchedulerConfig
from patchwork.kernels import dispatch
from tests.conftest import random_blt

T = TypeVar("T")

# Thresholds sit inside the random model's entropy range (about 5.0 to 5.2
# nats), so every mode cuts patches of mixed lengths.
PATCHINGS = {
    "entropy": {"threshold": 5.12},
    "entropy-max-length": {"threshold": 5.14, "max_patch_length": 3},
    "monotonic": {"mode": "monotonic", "threshold": 0.045},
    "static": {"mode": "static", "patch_size": 3},
    "space": {"mode": "space"},
}


def make_engine(patching: dict | None = None, window: int = 6, **scheduler) -> BltEngine:
    """A random BLT behind a scheduler. Short windows: the ring caches wrap
    around within the tests' lengths."""
    model = random_blt(seed=4, window=window, patching=patching or PATCHINGS["entropy"])
    config = SchedulerConfig(**{"max_batch_size": 4, "max_sequence_bytes": 400, **scheduler})
    return BltEngine(model, model.cfg, name="random", scheduler=config)


def record_launch_grids(monkeypatch, module, kernel_name: str) -> list[tuple]:
    """Wraps ``module.kernel_name`` (a Triton kernel) so every launch records
    its grid; returns that list: proof that the Triton path ran, and how."""
    grids: list[tuple] = []
    kernel = getattr(module, kernel_name)

    class Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(module, kernel_name, Recorded())
    return grids


def generate_on_kernels(engine: BltEngine, prompt: bytes, params: SamplingParams,
                        kernel: str) -> tuple[Generation, Generation, int]:
    """The engine's result with every kernel's reference, then with Triton
    forced (the interpreter, on CPU), and how often ``kernel`` launched in
    the second run. Closes the engine."""
    try:
        with dispatch.forced("reference"):
            expected = engine.generate_one(prompt, params)
        before = dispatch.launches[kernel]
        with dispatch.forced("triton"):
            actual = engine.generate_one(prompt, params)
    finally:
        engine.close()
    return expected, actual, dispatch.launches[kernel] - before


def random_prompts(seed: int, count: int) -> list[bytes]:
    rng = random.Random(seed)
    kinds = [
        lambda: b"",
        lambda: bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))),  # binary
        lambda: "".join(rng.choice("ñandú日本語🎉 ok") for _ in range(rng.randint(1, 12))).encode(),
        lambda: bytes(rng.choice(b"abc de\n") for _ in range(rng.randint(1, 90))),
    ]
    return [kinds[i % len(kinds)]() for i in range(count)]


@contextmanager
def admitted_together(engine: BltEngine) -> Iterator[None]:
    """Requests submitted inside are admitted in the same scheduler step (the
    scheduler waits between steps until the block ends)."""
    with engine.scheduler._lock:
        yield


def reference(engine: BltEngine, prompt: bytes, params: SamplingParams) -> Generation:
    """The full-recompute result the fast path is held to."""
    *_, result = engine.generate_reference(prompt, params)
    return result


def wait_until(condition: Callable[[], T], timeout_s: float = 60.0, interval_s: float = 0.02, what: str = "") -> T:
    """Polls ``condition`` until it returns something truthy, and returns it;
    fails the test after ``timeout_s`` (a bound for a busy machine, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")
        time.sleep(interval_s)


def stats(handle, timeout_s: float = 120.0) -> dict:
    """A model replica's scheduler stats (``ModelServer.stats``), through a
    Ray Serve handle; the call takes one of the replica's request places."""
    return handle.stats.remote().result(timeout_s=timeout_s)


def idle(handle) -> bool:
    """Whether nothing runs or waits on the replica behind ``handle``."""
    current = stats(handle)
    return current["running"] == 0 and current["waiting"] == 0


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """The samples of a Prometheus endpoint on loopback: (name, labels, value)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = []
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line)
        if match:
            name, labels, value = match.groups()
            samples.append((name, dict(re.findall(r'(\w+)="([^"]*)"', labels or "")), float(value)))
    return samples


def metric(samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    return sum(value for sample, tags, value in samples
               if sample == name and all(tags.get(k) == v for k, v in labels.items()))
