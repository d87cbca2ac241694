"""What serving adds to the smallest call of each family: the p50 of the call
through gRPC, the gateway and Ray Serve, minus the p50 of the same work done
in this process (the same checkpoint as the served model; one call each way
in turn, so the machine's drift falls on both). Beside it, the p50 of each
pair's difference (served minus the in-process call just before it): the
steadier estimate where the call itself varies by more than the overhead
(CM3Leon's image, 140-170 ms give or take 20 ms here).

- BLT (``ByteLM``): a 1-byte ``Generate``; in process, the engine's own call.
- CM3Leon (``Multimodal``): a 1-image ``GenerateImage`` with the model's
  default decoding; in process, ``Cm3LeonServer.generate_image`` (the same
  generation, ranking and PNG encoding).
- MAViL (``AudioVideo``): a 1-clip ``Embed`` of the load test's clip (a WAV
  tone and PNG frames); in process, reading the clip (``read_clip``) and
  ``MavilServer.embed``.

What is left is the transport: gRPC and protobuf both ways, the edge, the
gateway's handler and any Ray hop to a model replica.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from patchwork.engines.checkpoint import read_header

PROMPT = "def "
IMAGE_PROMPT = "a small red circle at the top left"


@dataclass
class Probe:
    """One family's smallest call: ``local`` runs it in this process,
    ``served`` through a ``patchwork.Client``; ``close`` frees the model."""

    call: str
    local: Callable[[], object]
    served: Callable[[object, str], object]
    close: Callable[[], None]


def probe(checkpoint: Path) -> Probe:
    """The probe of ``checkpoint``'s family."""
    family = read_header(checkpoint)[0].family
    if family == "cm3leon":
        return _cm3leon(checkpoint)
    if family == "mavil":
        return _mavil(checkpoint)
    return _bytes(checkpoint)


def _bytes(checkpoint: Path) -> Probe:
    from patchwork.engines.api import SamplingParams
    from patchwork.engines.loading import load

    engine = load(checkpoint)
    params = SamplingParams(max_new_bytes=1)
    return Probe("1-byte Generate", lambda: engine.generate_one(PROMPT.encode(), params),
                 lambda client, model: client.generate(PROMPT, max_new_bytes=1, model=model), engine.close)


def _server(checkpoint: Path):
    """The family's model server, built as a replica builds it (one thread)."""
    from patchwork.serving.families import served_family
    from patchwork.serving.grpc_services import load_object

    server_type = load_object(served_family(read_header(checkpoint)[0].family).deployment)
    return server_type(str(checkpoint), "cpu", 1)


def _cm3leon(checkpoint: Path) -> Probe:
    server = _server(checkpoint)
    loop = asyncio.new_event_loop()

    def local():
        return loop.run_until_complete(server.generate_image(IMAGE_PROMPT, {}, 1, None))

    return Probe("1-image GenerateImage", local,
                 lambda client, model: client.generate_image(IMAGE_PROMPT, model=model), _closer(server, loop))


def _mavil(checkpoint: Path) -> Probe:
    from patchwork.loadtests.inputs import clips
    from patchwork.loadtests.plan import clip_inputs
    from patchwork.serving.audiovideo import read_clip
    from patchwork.serving.config import Limits

    server = _server(checkpoint)
    clip = clips(clip_inputs(server.describe().config))[0]  # the load test's first clip
    loop = asyncio.new_event_loop()

    def local():
        return loop.run_until_complete(server.embed(read_clip(clip, "clip", Limits())))

    return Probe("1-clip Embed", local, lambda client, model: client.embed(clip, model=model), _closer(server, loop))


def _closer(server, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Stops the server's engine and its gauges, then the loop they ran on."""
    def close():
        server.close()
        loop.run_until_complete(asyncio.sleep(0))  # the gauges' cancellation runs
        loop.close()
    return close


def measure(checkpoint: Path, client, model: str, requests: int) -> dict:
    """p50s (and the served p90) in seconds of ``requests`` calls each way,
    after one warm-up each: one in process, then one served, in turn, so
    that the machine's drift (its other load, its clock speed) falls on both."""
    probe_ = probe(checkpoint)
    try:
        probe_.local()
        probe_.served(client, model)
        in_process, served = [], []
        for _ in range(requests):
            in_process.append(_seconds(probe_.local))
            served.append(_seconds(lambda: probe_.served(client, model)))
    finally:
        probe_.close()
    return {"call": probe_.call, "requests": requests, "in_process_p50_s": statistics.median(in_process),
            "served_p50_s": statistics.median(served), "served_p90_s": statistics.quantiles(served, n=10)[-1],
            "overhead_p50_s": statistics.median(served) - statistics.median(in_process),
            "paired_overhead_p50_s": statistics.median(s - i for s, i in zip(served, in_process))}


def _seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def markdown(result: dict) -> str:
    return (f"{result['call']}, {result['requests']} sequential calls each, in turn:\n"
            f"- in-process p50: {1000 * result['in_process_p50_s']:.2f} ms\n"
            f"- through gRPC + Ray Serve p50: {1000 * result['served_p50_s']:.2f} ms "
            f"(p90 {1000 * result['served_p90_s']:.2f} ms)\n"
            f"- overhead p50: {1000 * result['overhead_p50_s']:.2f} ms "
            f"(p50 of each pair's difference: {1000 * result['paired_overhead_p50_s']:.2f} ms)\n")
