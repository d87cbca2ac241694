"""MAViL's speed: encoder throughput at batch 1 and 32, and served throughput
with 16 concurrent clients against one at a time.

    patchwork bench mavil --checkpoint DIR [--clips N] [--json FILE]
        [--target HOST:PORT [--model NAME] | --serve]

The encoder is timed on prepared clips (spectrogram patches and tubelets of
world clips with both modalities): one clip per pass, then 32 per pass. The
served numbers need a server: ``--target`` measures a running one (``--model``
names the MAViL model), ``--serve`` starts a local one serving only this
checkpoint (one CPU replica) and stops it afterwards. Each served run sends
the same clips as Embed requests, as WAV and PNG files. Each phase says on
stderr when it starts and what it measured when it ends (``training.progress``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from patchwork.engines.checkpoint import CheckpointError
from patchwork.engines.mavil.engine import Clip, load_mavil
from patchwork.training.progress import Phases

CONCURRENT_CLIENTS = 16
BATCH = 32


def world_clips(engine, count: int) -> list:
    from patchwork.training.avworld import AudioVideoWorld

    video, audio = engine.config.video, engine.config.audio
    return AudioVideoWorld(seed=1, frames=video.frames, image_size=video.image_size, seconds=audio.seconds).take(count)


def encoder_throughput(engine, clips: list, repeats: int = 3) -> dict[str, float]:
    """Clips per second of the encoder passes (best of ``repeats``) at batch 1 and at batch 32."""
    prepared = [engine.prepare(Clip(c.waveform, c.frames.astype(np.float32) / 255)) for c in clips]
    engine.run_batch(prepared[:BATCH])  # warm-up

    def rate(batch: int) -> float:
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for start in range(0, len(prepared), batch):
                engine.run_batch(prepared[start:start + batch])
            best = min(best, time.perf_counter() - started)
        return len(prepared) / best

    one, many = rate(1), rate(BATCH)
    return {"encoder_clips_per_s_batch_1": one, "encoder_clips_per_s_batch_32": many, "batching_speedup": many / one}


def served_throughput(target: str, model: str, clips: list, token: str | None = None) -> dict[str, float]:
    """Embed requests per second from one client at a time, then from 16 concurrent clients."""
    import grpc

    from patchwork.engines.wav import wav_bytes
    from patchwork.serving.images import png
    from patchwork.v1 import audiovideo_pb2 as pb2
    from patchwork.v1 import audiovideo_pb2_grpc

    requests = [pb2.EmbedRequest(model=model, clip=pb2.Clip(wav=wav_bytes(c.waveform, 16000),
                                                             frames=[png(frame) for frame in c.frames]))
                for c in clips]
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(target) as channel:
        stub = audiovideo_pb2_grpc.AudioVideoStub(channel)

        def call(request):
            return stub.Embed(request, timeout=300, metadata=metadata)

        for request in requests[:4]:
            call(request)  # warm-up
        started = time.perf_counter()
        for request in requests:
            call(request)
        sequential = len(requests) / (time.perf_counter() - started)
        with ThreadPoolExecutor(CONCURRENT_CLIENTS) as pool:
            started = time.perf_counter()
            list(pool.map(call, requests))
            concurrent = len(requests) / (time.perf_counter() - started)
    return {"served_clips_per_s_one_client": sequential,
            f"served_clips_per_s_{CONCURRENT_CLIENTS}_clients": concurrent,
            "served_speedup": concurrent / sequential}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_and_measure(checkpoint: Path, clips: list, token: str | None) -> dict[str, float]:
    """Starts a local server with only ``checkpoint`` (one CPU replica), measures it, and stops it."""
    import ray
    from ray import serve

    from patchwork.serving import cluster, ops
    from patchwork.serving.config import DeploymentOptions, ServingConfig
    from patchwork.serving.deploy import apply, deploy_config

    with tempfile.TemporaryDirectory() as root:
        name = checkpoint.resolve().name
        os.symlink(checkpoint.resolve(), Path(root) / name)
        config = ServingConfig(checkpoints=Path(root), grpc_port=_free_port(), direct_grpc_port=_free_port(),
                               http_port=_free_port(), metrics_port=_free_port(),
                               models=DeploymentOptions(max_ongoing_requests=64, max_queued_requests=64))
        cluster.start(config, num_cpus=cluster.local_cpus(config, [name]), logging_level="ERROR",
                      log_to_driver=False)
        try:
            apply(deploy_config(config, [name]))
            port = ops.wait_gateway_port(timeout_s=300)  # the gateway replica's own (direct ingress)
            if port is None or not ops.wait_healthy(f"127.0.0.1:{port}", timeout_s=300):
                raise RuntimeError("the local server did not become healthy")
            return served_throughput(f"127.0.0.1:{port}", name, clips, token)
        finally:
            serve.shutdown()
            ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchwork bench mavil", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--clips", type=int, default=256, help="clips per measurement (default 256)")
    parser.add_argument("--json", type=Path)
    served = parser.add_mutually_exclusive_group()
    served.add_argument("--target", help="host:port of a running server to measure")
    served.add_argument("--serve", action="store_true", help="start a local server with only this checkpoint")
    parser.add_argument("--model", default="", help="the MAViL model's name on --target")
    parser.add_argument("--token", default=os.environ.get("PATCHWORK_AUTH_TOKEN"))
    args = parser.parse_args(argv)
    try:
        engine = load_mavil(args.checkpoint)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    phases = Phases("bench mavil", 2 + bool(args.target or args.serve))
    try:
        with phases(f"{args.clips} clips of the procedural world") as phase:
            clips = world_clips(engine, args.clips)
            phase.result = f"{len(clips)} clips"
        with phases("the encoder at batch 1 and at batch 32") as phase:
            results = {"threads": torch.get_num_threads(), "clips": len(clips), **encoder_throughput(engine, clips)}
            phase.result = (f"{results['encoder_clips_per_s_batch_1']:.1f} clips/s at batch 1, "
                            f"{results['encoder_clips_per_s_batch_32']:.1f} at batch 32")
    finally:
        engine.close()
    if args.target or args.serve:
        where = args.target or "a local server of this checkpoint alone"
        with phases(f"Embed through {where}: one client, then {CONCURRENT_CLIENTS}") as phase:
            results.update(served_throughput(args.target, args.model, clips, args.token) if args.target
                           else serve_and_measure(args.checkpoint, clips, args.token))
            phase.result = (f"{results['served_clips_per_s_one_client']:.1f} clips/s from one client, "
                            f"{results[f'served_clips_per_s_{CONCURRENT_CLIENTS}_clients']:.1f} from "
                            f"{CONCURRENT_CLIENTS}")
    for name, value in results.items():
        print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
