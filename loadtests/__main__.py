"""Load tests of a Patchwork server with Locust (headless, bounded in time, loopback only).

    patchwork loadtest run     [--target 127.0.0.1:9010] [--users 16] [--duration 60s] [--out DIR] [--slo-p99-ms MS]
                               [--mix all] [--model NAME ...] [--max-new-bytes 64] [--samples 1]
                               [--ramp USERS@TIME,...] [--record-replicas]
    patchwork loadtest sweep   [--users-list 1,2,4,8,16,32] [--duration 30s] ...
    patchwork loadtest compare [--replicas 1,2] [--deployment model-blt-default] [--users 16] ...
    patchwork loadtest overhead --checkpoint DIR [--model NAME] ... [--target ...] [--requests 200]

--mix says which RPCs the users call and how often, and --model which
served model answers a family's RPCs (``plan``'s docstring); by default
every RPC of every family the server serves. Each run writes Locust's CSV
files, a markdown summary (each RPC's requests, failures, requests/s and
output in its unit: bytes, images, captions, infills, clips per second;
mean, p50, p90 and p99 of each RPC's end-to-end latency and of a stream's
time to first byte, time per output byte and inter-byte latency; the error
rate) and PNG plots into --out. A sweep adds the knee: the user count after
which throughput stops growing. ``overhead`` measures what serving adds to
the smallest call of the checkpoint's family (``loadtests/overhead.py``).
With --start-if-down a server is started (`serving up --detach`) when none
answers at the target, its gateway answering at the target's port (direct
ingress), and stopped afterwards. --slo-p99-ms makes the run
exit with status 3 when the chosen p99 (a stream's time to first byte, or
the largest end-to-end p99 of the mix's RPCs) is over the threshold.

--ramp runs a shape instead of a fixed number of users: points USERS@TIME,
the users moving in a straight line from each point to the next, the run
ending at the last (e.g. ``1@0s,32@60s,32@2m,1@150s,1@5m``: up to 32 users in
a minute, a minute there, back to one and a wait for the scale-down).
--record-replicas reads every deployment's target and running replicas once
a second during each run (``loadtests/replicas.py``) into the run's
``run_replicas.csv``; ``run`` also gives their ranges in its summary and
draws them under its latency.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

from patchwork.client import CA_FILE_ENV
from patchwork.loadtests import replicas, report
from patchwork.loadtests.plan import PLAN_ENV, Plan, PlanError, duration_seconds, make_plan, parse_mix, parse_ramp

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


class UsageError(Exception):
    pass


def seconds(duration: str) -> float:
    parsed = duration_seconds(duration)
    if parsed is None:
        raise UsageError(f"--duration {duration!r}: expected e.g. 60s, 5m")
    return parsed


def check_loopback(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    try:
        address = ipaddress.ip_address(socket.gethostbyname(host) if host != "::1" else host)
    except (OSError, ValueError):
        raise UsageError(f"--target {target!r}: cannot resolve {host!r}") from None
    if not address.is_loopback:
        raise UsageError(f"--target {target!r}: load tests only target loopback addresses")
    return host, int(port)


def healthy(target: str, timeout_s: float = 10.0) -> bool:
    """Whether the server at ``target`` answers SERVING; ``timeout_s`` is patient,
    since a busy machine can take seconds to read the deployments' status."""
    import grpc

    from patchwork.client import Client

    with Client(target) as client:
        try:
            return client.health(timeout=timeout_s) == "SERVING"
        except grpc.RpcError:
            return False


def served_plan(args: argparse.Namespace) -> Plan:
    """The plan of ``--mix`` and ``--model`` on the models the server at ``--target`` lists."""
    from patchwork.client import Client

    with Client(args.target, timeout=60) as client:
        models = list(client.list_models().models)
    plan = make_plan(args.mix, models, args.model or [], args.max_new_bytes, args.samples)
    plan.ramp = parse_ramp(args.ramp) if getattr(args, "ramp", None) else None
    if args.slo_p99_ms is not None and args.slo_metric == "ttfb" and "GenerateStream" not in plan.rpcs:
        raise UsageError(f"--slo-metric ttfb: the --mix {args.mix!r} has no GenerateStream (use --slo-metric e2e)")
    print(f"mix: {plan.describe()}")
    return plan


def locust(target: str, users: int, duration: float, prefix: Path, plan: Plan,
           args: argparse.Namespace) -> report.RunSummary:
    """One Locust run (of ``users``, or of the plan's ramp), recording the
    replicas beside it when asked to."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, PLAN_ENV: plan.model_dump_json()}
    shape = [] if plan.ramp else ["-u", str(users), "-r", str(args.spawn_rate or users), "-t", f"{int(duration)}s"]
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", "--host", target,
        *shape, "--stop-timeout", "30", "--csv", str(prefix), "--csv-full-history", "--exit-code-on-error", "0",
    ]
    with replicas.recording(replicas.beside(prefix)) if args.record_replicas else contextlib.nullcontext():
        subprocess.run(command, env=env, check=True, timeout=duration + 120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return report.summarize(prefix, users, duration)


def _slo_failed(summary: report.RunSummary, plan: Plan, args: argparse.Namespace) -> bool:
    if args.slo_p99_ms is None:
        return False
    latencies = {"GenerateStream time to first byte": summary.ttfb} if args.slo_metric == "ttfb" else {
        f"{rpc} end to end": summary.e2e(rpc) for rpc in plan.rpcs}
    p99s = {name: latency.p99 if latency else float("inf") for name, latency in latencies.items()}
    worst = max(p99s, key=p99s.get)
    failed = p99s[worst] > args.slo_p99_ms
    print(f"SLO {args.slo_metric} p99 <= {args.slo_p99_ms} ms: {'FAILED' if failed else 'met'} "
          f"(p99 {p99s[worst]:.1f} ms, {worst})")
    return failed


def run_one(args: argparse.Namespace, plan: Plan) -> int:
    if plan.ramp:
        users, duration = max(point.users for point in plan.ramp), plan.ramp[-1].at_s
        title = f"up to {users} users ({args.ramp}) against {args.target}"
    else:
        users, duration = args.users, seconds(args.duration)
        title = f"{users} users against {args.target}"
    summary = locust(args.target, users, duration, args.out / "run", plan, args)
    text = report.markdown(summary, title, plan)
    replicas_csv = replicas.beside(args.out / "run") if args.record_replicas else None
    if replicas_csv:
        text += report.replicas_markdown(replicas.read(replicas_csv))
    (args.out / "summary.md").write_text(text)
    report.plot_history(args.out / "run", args.out / "latency_over_time.png", replicas_csv)
    print(text)
    return 3 if _slo_failed(summary, plan, args) else 0


def run_sweep(args: argparse.Namespace, plan: Plan) -> int:
    users_list = [int(u) for u in args.users_list.split(",")]
    summaries = [locust(args.target, users, seconds(args.duration), args.out / f"users_{users}" / "run", plan, args)
                 for users in users_list]
    text = report.sweep_markdown(summaries, plan) + "\n" + report.knee_line(report.knee(summaries))
    (args.out / "sweep.md").write_text(f"mix: {plan.describe()}\n\n" + text)
    report.plot_sweep(summaries, args.out / "sweep.png", plan)
    print(text)
    return 3 if any(_slo_failed(s, plan, args) for s in summaries) else 0


def run_compare(args: argparse.Namespace, plan: Plan) -> int:
    summaries = []
    for count in [int(r) for r in args.replicas.split(",")]:
        scaled = subprocess.run([sys.executable, "-m", "patchwork.serving", "scale", args.deployment, str(count)],
                                capture_output=True, text=True, timeout=600)
        if scaled.returncode != 0:
            raise UsageError(f"scaling {args.deployment} to {count} (exit status {scaled.returncode}): "
                             f"{scaled.stderr.strip()}")
        summary = locust(args.target, args.users, seconds(args.duration), args.out / f"replicas_{count}" / "run",
                         plan, args)
        summary.users = count  # the x axis of this comparison
        summaries.append(summary)
    text = report.sweep_markdown(summaries, plan, label="replicas")
    (args.out / "compare.md").write_text(f"{args.users} users, {args.deployment}\n\n" + text)
    report.plot_sweep(summaries, args.out / "compare.png", plan, label="replicas")
    print(text)
    return 3 if any(_slo_failed(s, plan, args) for s in summaries) else 0


def run_overhead(args: argparse.Namespace) -> int:
    """What serving adds to the checkpoint's family's smallest call (``overhead``)."""
    from patchwork.client import NO_RETRY, Client
    from patchwork.loadtests import overhead

    models = args.model or [""] * len(args.checkpoint)
    if len(models) != len(args.checkpoint):
        raise UsageError(f"{len(args.checkpoint)} --checkpoint and {len(models)} --model: give one model per "
                         "checkpoint, or none (each family's RPCs then go to the server's choice)")
    with Client(args.target, token=os.environ.get("PATCHWORK_AUTH_TOKEN") or None, timeout=60,
                retry=NO_RETRY) as client:
        text = "\n".join(overhead.markdown(overhead.measure(checkpoint, client, model, args.requests))
                         for checkpoint, model in zip(args.checkpoint, models))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.md").write_text(text)
    print(text)
    return 0


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patchwork loadtest", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "sweep", "compare", "overhead"):
        command = commands.add_parser(name)
        command.add_argument("--target", default="127.0.0.1:9010")
        command.add_argument("--out", type=Path, default=Path("results") / "loadtest" / name)
        command.add_argument("--max-new-bytes", type=_positive, default=64,
                             help="bytes a generation, a caption or an infill may produce")
        command.add_argument("--duration", help="how long each run lasts (default 60s)")
        command.add_argument("--users", type=_positive, help="users of each run (default 16)")
        command.add_argument("--spawn-rate", type=float, help="users started per second (default: all at once)")
        command.add_argument("--slo-p99-ms", type=float)
        command.add_argument("--slo-metric", choices=["ttfb", "e2e"], default="ttfb")
        command.add_argument("--ca-file", type=Path, help="TLS: the CA that signed the server's certificate")
        command.add_argument("--start-if-down", type=Path, metavar="CHECKPOINTS",
                             help="start a server on these checkpoints when none answers (stopped afterwards)")
        if name == "sweep":
            command.add_argument("--users-list", default="1,2,4,8,16,32")
        if name == "compare":
            command.add_argument("--replicas", default="1,2")
            command.add_argument("--deployment", default="model-blt-default")
        if name == "overhead":
            command.add_argument("--checkpoint", type=Path, action="append", required=True,
                                 help="the served model's checkpoint (repeatable: one measurement each)")
            command.add_argument("--model", action="append",
                                 help="the served model of each --checkpoint, in order (default: the server's choice)")
            command.add_argument("--requests", type=int, default=200)
        else:
            command.add_argument("--mix", default="all",
                                 help="RPC=WEIGHT, a family (blt, cm3leon, mavil) or all, comma-separated")
            command.add_argument("--model", action="append", metavar="NAME",
                                 help="the served model that answers its family's RPCs (repeatable)")
            command.add_argument("--samples", type=_positive, default=1, help="images a GenerateImage asks for")
            command.add_argument("--record-replicas", action="store_true",
                                 help="record every deployment's replicas once a second during each run")
        if name == "run":
            command.add_argument("--ramp", metavar="USERS@TIME,...",
                                 help="users over time instead of --users and --duration, e.g. 1@0s,32@60s,1@2m")
    args = parser.parse_args(argv)
    try:
        if getattr(args, "ramp", None):
            if args.users is not None or args.duration is not None:
                raise UsageError("--ramp sets the users and the duration: leave out --users and --duration")
            parse_ramp(args.ramp)  # before a server is looked for
        args.users = 16 if args.users is None else args.users
        args.duration = "60s" if args.duration is None else args.duration
        seconds(args.duration)  # every run is bounded in time
        if args.command != "overhead":
            parse_mix(args.mix)
        if args.ca_file is not None:
            if not args.ca_file.is_file():
                raise UsageError(f"--ca-file {args.ca_file}: no such file")
            os.environ[CA_FILE_ENV] = str(args.ca_file.resolve())  # every client here and in Locust's users
        _, port = check_loopback(args.target)
        started = False
        if not healthy(args.target):
            if args.start_if_down is None:
                raise UsageError(f"no healthy server at {args.target}; start one or pass --start-if-down CHECKPOINTS")
            subprocess.run([sys.executable, "-m", "patchwork.serving", "up", "--detach", "--checkpoints",
                            str(args.start_if_down), "--direct-grpc-port", str(port)], check=True, timeout=900)
            started = True
        try:
            if args.command == "overhead":
                return run_overhead(args)
            handler = {"run": run_one, "sweep": run_sweep, "compare": run_compare}
            return handler[args.command](args, served_plan(args))
        finally:
            if started:
                subprocess.run([sys.executable, "-m", "patchwork.serving", "down"], timeout=120)
    except (UsageError, PlanError, replicas.RecorderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
