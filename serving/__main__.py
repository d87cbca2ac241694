"""patchwork serve up | down | config | status | scale | models ...

``up`` starts a local Ray cluster, Ray Serve's gRPC proxy and the Patchwork
application serving every checkpoint under --checkpoints, by deploying the
Ray Serve config file of the chosen setup. Without --detach it stays in the
foreground and stops everything on Ctrl-C; with --detach the cluster keeps
running until ``patchwork serve down``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import signal
import sys
import threading
from pathlib import Path

import yaml
from pydantic import ValidationError

from patchwork.engines.checkpoint import validation_summary
from patchwork.serving import client
from patchwork.serving.binding import address
from patchwork.serving.cluster import ClusterError
from patchwork.serving.config import ServingConfig

EXAMPLES = """\
Patchwork is serving {models} on {listen} (default model: {default}).
Metrics: http://{metrics}/metrics
Try:
  patchwork client --target {target} generate "def " --max-new-bytes 64
  patchwork client --target {target} generate "import " --stream --temperature 0.8 --seed 1
  patchwork client --target {target} score "def main():"
  patchwork serve models --target {target}
"""


def listening(host: str, port: int) -> str:
    """Where a port listens, as `up` says it: ``host:port``, and which interfaces."""
    where = "every interface" if ipaddress.ip_address(host).is_unspecified else (
        "loopback only" if ipaddress.ip_address(host).is_loopback else "this address only")
    return f"{address(host, port)} ({where})"


def load_config(args: argparse.Namespace) -> ServingConfig:
    """--config FILE (a ServingConfig as YAML) or --setup, then the command-line overrides."""
    from patchwork.serving.deploy import setup

    if args.config is not None:
        config = ServingConfig.model_validate(yaml.safe_load(args.config.read_text()) or {})
    else:
        config = setup(args.setup)
    overrides = {key: getattr(args, key) for key in ("checkpoints", "host", "grpc_port", "direct_grpc_port",
                                                      "ingress", "device", "metrics_port")
                 if getattr(args, key, None) is not None}
    if (getattr(args, "tls_cert", None) is None) != (getattr(args, "tls_key", None) is None):
        raise SystemExit("error: --tls-cert and --tls-key go together")
    if getattr(args, "tls_cert", None) is not None:
        overrides["tls"] = {"cert": args.tls_cert, "key": args.tls_key, "port": args.tls_port}
    if getattr(args, "gateway_models", None) is not None:
        named = args.gateway_models
        overrides["gateway_models"] = named if named == "auto" else [m for m in named.split(",") if m and m != "none"]
    try:
        return ServingConfig.model_validate({**config.model_dump(), **overrides})
    except ValidationError as e:
        raise SystemExit(f"error: {validation_summary(e)}") from None


def up(args: argparse.Namespace) -> int:
    import ray

    from patchwork.engines.checkpoint import CheckpointError
    from patchwork.serving import cluster, ops, tls_front
    from patchwork.serving.app import default_model, discover_checkpoints
    from patchwork.serving.deploy import apply, deploy_config

    config = load_config(args)
    config = config.model_copy(update={"checkpoints": config.checkpoints.resolve()})
    try:
        models = discover_checkpoints(config.checkpoints, config.families)
        default = default_model(models, config)
        config.gateway_for(list(models))  # the models the gateway runs are served and scale alike
        if config.tls is not None:
            for name, path in (("--tls-cert", config.tls.cert), ("--tls-key", config.tls.key)):
                if not path.is_file():
                    raise ValueError(f"{name} {path}: no such file")
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cluster.start(config, num_cpus=args.num_cpus or cluster.local_cpus(config, list(models)), detach=args.detach)
    apply(deploy_config(config, list(models)))
    port = config.grpc_port
    if config.ingress == "direct":
        # The first free port from direct_grpc_port up: another server may hold the configured one.
        port = ops.wait_gateway_port(timeout_s=args.timeout)
    if port is None or not ops.wait_healthy(address(config.client_host(), port), timeout_s=args.timeout):
        print("error: the application did not become healthy; see `patchwork serve status`", file=sys.stderr)
        return 1
    public = listening(config.plaintext_host(), port)
    if config.tls is not None:
        try:
            public = f"{listening(config.host, config.tls.port)} with TLS (NGINX), in front of {public}"
            tls_front.start(config, port)
        except tls_front.FrontError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(EXAMPLES.format(models=", ".join(sorted(models)), listen=public, default=default,
                          target=address(config.client_host(), port),
                          metrics=f"{config.metrics_host}:{config.metrics_port}"), flush=True)
    if config.tls is not None:
        print(f"Clients elsewhere: --target <this host>:{config.tls.port} --ca-file <the CA that signed "
              f"{config.tls.cert}>.", flush=True)
    if config.ingress == "direct":
        busy = f"; {config.direct_grpc_port} was taken" if port != config.direct_grpc_port else ""
        print(f"The gateway answers on {listening(config.plaintext_host(), port)} itself (direct ingress{busy}) "
              f"and through Ray Serve's gRPC proxy on {listening(config.plaintext_host(), config.grpc_port)}.",
              flush=True)
    if args.detach:
        print("Running in the background; stop it with `patchwork serve down`.")
        return 0
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    print("Press Ctrl-C to stop (requests in flight get the drain grace period to finish).", flush=True)
    stopped.wait()
    tls_front.stop()
    print(f"stopped in {ops.stop():.1f} s")
    ray.shutdown()
    return 0


def down(args: argparse.Namespace) -> int:
    """Drains and stops a detached server: requests in flight finish (or end
    with UNAVAILABLE after the grace period), new ones are refused."""
    import ray

    from patchwork.serving import cluster, ops, tls_front

    tls_front.stop()
    try:
        cluster.connect()
    except ConnectionError:
        print("no running server")
        return 0
    seconds = ops.stop(args.grace)
    ray.shutdown()
    cluster.ray_command("stop")
    print(f"stopped in {seconds:.1f} s")
    return 0


def config_file(args: argparse.Namespace) -> int:
    from patchwork.serving.app import discover_checkpoints
    from patchwork.serving.deploy import deploy_config, to_yaml

    config = load_config(args)
    models = list(discover_checkpoints(config.checkpoints, config.families)) if args.discover else ["blt-default"]
    text = to_yaml(deploy_config(config, models))
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def status_command(args: argparse.Namespace) -> int:
    from patchwork.serving import ops

    report = ops.status(placement=True)
    print(json.dumps(report, indent=2) if args.json else ops.format_status(report))
    return 0


def scale_command(args: argparse.Namespace) -> int:
    from patchwork.serving import ops

    try:
        ops.scale(args.deployment, args.replicas, timeout_s=args.timeout)
    except (KeyError, TimeoutError) as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 1
    print(f"{args.deployment}: {args.replicas} running replicas")
    return 0


def _setup_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setup", choices=["cpu", "gpu", "autoscale"], default="cpu")
    parser.add_argument("--config", type=Path, help="a ServingConfig as YAML (instead of --setup)")
    parser.add_argument("--checkpoints", type=Path)
    parser.add_argument("--host", help="the address the public gRPC ports listen on (default 127.0.0.1, "
                        "loopback only; 0.0.0.0 or :: opens them to the network: docs/security.md)")
    parser.add_argument("--tls-cert", type=Path, help="TLS for clients: the server's certificate (PEM); NGINX "
                        "terminates TLS on --host:--tls-port and the plaintext ports stay on loopback")
    parser.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    parser.add_argument("--tls-port", type=int, default=9443, help="where TLS listens (default 9443)")
    parser.add_argument("--grpc-port", type=int, help="Ray Serve's gRPC proxy")
    parser.add_argument("--ingress", choices=["direct", "proxy"],
                        help="direct (default): the gateway also answers gRPC itself, one hop less; proxy: only the proxy")
    parser.add_argument("--direct-grpc-port", type=int, help="the first gateway replica's own gRPC port (direct ingress)")
    parser.add_argument("--gateway-models",
                        help="models the gateway runs itself, no hop: auto (default: the model when only one "
                             "is served, else each without options of its own while models get one CPU replica "
                             "each), none, or names separated by commas")
    parser.add_argument("--metrics-port", type=int)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchwork serve", description="Serve Patchwork models over gRPC.")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start serving every checkpoint under --checkpoints")
    _setup_arguments(start)
    start.add_argument("--num-cpus", type=int, help="CPUs of the local Ray cluster (default: the machine's, or "
                       "what one replica of every model asks for when that is more)")
    start.add_argument("--timeout", type=float, default=300.0,
                       help="seconds to wait for the application to answer health checks (default 300)")
    start.add_argument("--detach", action="store_true", help="leave the server running in the background")
    stop = commands.add_parser("down", help="drain and stop a detached server")
    stop.add_argument("--grace", type=float, help="seconds requests in flight may take (default: the setup's drain_grace_s)")
    config = commands.add_parser("config", help="print the Ray Serve config file of a setup")
    _setup_arguments(config)
    config.add_argument("--discover", action="store_true", help="list the checkpoints found instead of blt-default")
    config.add_argument("--out", type=Path)
    status = commands.add_parser("status", help="applications, deployments and replicas of the running server")
    status.add_argument("--json", action="store_true")
    scale = commands.add_parser("scale", help="set a deployment's replica count, without dropping requests")
    scale.add_argument("deployment", help="e.g. model-blt-default or gateway")
    scale.add_argument("replicas", type=int)
    scale.add_argument("--timeout", type=float, default=300.0)
    models = commands.add_parser("models", help="the models being served, with their config and metrics")
    client.add_connection_arguments(models)
    args = parser.parse_args(argv)
    handlers = {"up": up, "down": down, "config": config_file, "status": status_command, "scale": scale_command,
                "models": client.list_models}
    try:
        return handlers[args.command](args)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
