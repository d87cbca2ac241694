"""python -m serving up | down | client ...

``up`` starts a local Ray cluster, Ray Serve's gRPC proxy and the Patchwork
application serving every checkpoint under --checkpoints. Without --detach it
stays in the foreground and stops everything on Ctrl-C; with --detach the
cluster keeps running until ``python -m serving down``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from serving import client
from serving.config import APP_NAME, ROUTE_PREFIX, ServingConfig

EXAMPLES = """\
Patchwork is serving {models} on 127.0.0.1:{port} (default model: {default}).
Try:
  python -m serving client --target 127.0.0.1:{port} generate "def " --max-new-bytes 64
  python -m serving client --target 127.0.0.1:{port} generate "import " --stream --temperature 0.8 --seed 1
  python -m serving client --target 127.0.0.1:{port} score "def main():"
"""


def _ray(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _wait_healthy(port: int, timeout_s: float) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    return False


def up(args: argparse.Namespace) -> int:
    import ray

    from engines.checkpoint import CheckpointError
    from serving.app import default_model, discover_checkpoints, start

    config = ServingConfig(checkpoints=args.checkpoints, grpc_port=args.grpc_port, device=args.device)
    try:
        models = discover_checkpoints(config.checkpoints)
        default = default_model(models, config)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cpus = str(args.num_cpus or os.cpu_count() or 1)
    if args.detach:
        _ray("start", "--head", "--num-cpus", cpus, "--include-dashboard=false", "--disable-usage-stats")
        ray.init(address="auto", logging_level="WARNING")
    else:
        ray.init(num_cpus=int(cpus), include_dashboard=False, logging_level="WARNING")
    start(config, APP_NAME, ROUTE_PREFIX)
    if not _wait_healthy(config.grpc_port, timeout_s=120):
        print("error: the application did not become healthy; see `ray logs` / `serve status`", file=sys.stderr)
        return 1
    print(EXAMPLES.format(models=", ".join(sorted(models)), port=config.grpc_port, default=default), flush=True)
    if args.detach:
        print("Running in the background; stop it with `python -m serving down`.")
        return 0
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    print("Press Ctrl-C to stop.", flush=True)
    stopped.wait()
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return 0


def down(_: argparse.Namespace) -> int:
    import ray
    from ray import serve

    try:
        ray.init(address="auto", logging_level="WARNING")
        serve.shutdown()
        ray.shutdown()
    except ConnectionError:
        pass
    _ray("stop")
    print("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description="Serve Patchwork models over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start serving every checkpoint under --checkpoints")
    start.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    start.add_argument("--grpc-port", type=int, default=9000)
    start.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    start.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")
    start.add_argument("--detach", action="store_true", help="leave the server running in the background")
    commands.add_parser("down", help="stop a detached server")
    client.add_arguments(commands.add_parser("client", help="call a running server"))
    args = parser.parse_args(argv)
    return {"up": up, "down": down, "client": client.run}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
