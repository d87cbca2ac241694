"""Reads Locust's CSV files and writes the summary tables and plots."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from patchwork.loadtests import replicas
from patchwork.loadtests.grpc_user import INTER_BYTE, TIME_PER_BYTE, TTFB
from patchwork.loadtests.plan import RPCS, Plan

STREAM = "/patchwork.v1.ByteLM/GenerateStream"
# Entries a stream reports beside its call's own.
DERIVED = (TTFB, TIME_PER_BYTE, INTER_BYTE)
PERCENTILES = ("50%", "90%", "99%")


@dataclass
class Latency:
    mean: float
    p50: float
    p90: float
    p99: float
    count: int


@dataclass
class CallStats:
    """One RPC's calls in a run."""

    requests: int
    failures: int
    outputs: float  # what they produced, in the RPC's unit
    e2e: Latency | None


@dataclass
class RunSummary:
    users: int
    seconds: float
    calls: dict[str, CallStats]  # RPC -> its calls, for the RPCs called
    ttfb: Latency | None
    time_per_byte: Latency | None
    inter_byte: Latency | None

    @property
    def requests(self) -> int:
        return sum(call.requests for call in self.calls.values())

    @property
    def failures(self) -> int:
        return sum(call.failures for call in self.calls.values())

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    @property
    def request_throughput(self) -> float:
        return self.requests / self.seconds

    @property
    def success_throughput(self) -> float:
        return (self.requests - self.failures) / self.seconds

    def throughput(self, unit: str) -> float:
        """What the calls produced per second, in ``unit`` (e.g. "images")."""
        return sum(call.outputs for rpc, call in self.calls.items() if RPCS[rpc].unit == unit) / self.seconds

    def e2e(self, rpc: str) -> Latency | None:
        call = self.calls.get(rpc)
        return call.e2e if call else None


def _rows(stats_csv: Path) -> dict[str, dict]:
    with open(stats_csv, newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def _calls(names) -> list[str]:
    """The names of calls (/package.Service/Rpc) among Locust's entries."""
    return [name for name in names if name != "Aggregated" and not name.endswith(DERIVED)]


def _latency(row: dict | None) -> Latency | None:
    if row is None or int(row["Request Count"]) == 0:
        return None
    values = {p: float(row[p]) if row[p] not in ("", "N/A") else float("nan") for p in PERCENTILES}
    return Latency(float(row["Average Response Time"]), values["50%"], values["90%"], values["99%"],
                   int(row["Request Count"]))


def summarize(prefix: Path, users: int, seconds: float) -> RunSummary:
    """Summary of one Locust run whose CSV files start with ``prefix``."""
    rows = _rows(Path(f"{prefix}_stats.csv"))
    calls = {}
    for name in _calls(rows):
        row = rows[name]
        count = int(row["Request Count"])
        calls[name.rpartition("/")[2]] = CallStats(count, int(row["Failure Count"]),
                                                   float(row["Average Content Size"]) * count, _latency(row))
    return RunSummary(users=users, seconds=seconds, calls=calls, ttfb=_latency(rows.get(STREAM + TTFB)),
                      time_per_byte=_latency(rows.get(STREAM + TIME_PER_BYTE)),
                      inter_byte=_latency(rows.get(STREAM + INTER_BYTE)))


def _cell(latency: Latency | None, field: str) -> str:
    return "-" if latency is None else f"{getattr(latency, field):.1f}"


def markdown(summary: RunSummary, title: str, plan: Plan) -> str:
    """A run's summary: its throughput in each unit, and each RPC's, and its latencies."""
    outputs = ", ".join(f"{summary.throughput(unit):.2f} {unit}/s" for unit in plan.units)
    lines = [
        f"## {title}",
        "",
        f"{'up to ' if plan.ramp else ''}{summary.users} users for {summary.seconds:.0f} s: "
        f"{summary.requests} requests, "
        f"{summary.failures} failed (error rate {100 * summary.error_rate:.2f}%).",
        f"Request throughput {summary.request_throughput:.2f} requests/s; output throughput {outputs}.",
        "",
        "| RPC | model | weight | requests | failed | requests/s | output/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for call in plan.calls:
        stats = summary.calls.get(call.rpc, CallStats(0, 0, 0.0, None))
        lines.append(f"| {call.rpc} | {call.model} | {call.weight} | {stats.requests} | {stats.failures} | "
                     f"{stats.requests / summary.seconds:.2f} | {stats.outputs / summary.seconds:.2f} "
                     f"{RPCS[call.rpc].unit}/s |")
    lines += ["", "| latency (ms) | mean | p50 | p90 | p99 | samples |", "| --- | --- | --- | --- | --- | --- |"]
    latencies = [(f"end to end, {rpc}", summary.e2e(rpc)) for rpc in plan.rpcs]
    if "GenerateStream" in plan.rpcs:
        latencies[:0] = [("time to first byte (stream)", summary.ttfb),
                         ("time per output byte (stream)", summary.time_per_byte),
                         ("inter-byte latency (stream)", summary.inter_byte)]
    for name, latency in latencies:
        count = "-" if latency is None else str(latency.count)
        lines.append(f"| {name} | " + " | ".join(_cell(latency, f) for f in ("mean", "p50", "p90", "p99"))
                     + f" | {count} |")
    return "\n".join(lines) + "\n"


def sweep_markdown(summaries: list[RunSummary], plan: Plan, label: str = "users") -> str:
    """Throughput and errors, then each RPC's end-to-end p50 and p99, one row per run."""
    stream = "GenerateStream" in plan.rpcs
    header = ["requests/s", *(f"{unit}/s" for unit in plan.units), "errors", *(["TTFB p50", "TTFB p99"] * stream)]
    lines = [f"| {label} | " + " | ".join(header) + " |", "| --- " * (len(header) + 1) + "|"]
    for s in summaries:
        cells = [f"{s.request_throughput:.2f}", *(f"{s.throughput(unit):.2f}" for unit in plan.units),
                 f"{100 * s.error_rate:.2f}%", *([_cell(s.ttfb, "p50"), _cell(s.ttfb, "p99")] * stream)]
        lines.append(f"| {s.users} | " + " | ".join(cells) + " |")
    header = [f"{rpc} {p}" for rpc in plan.rpcs for p in ("p50", "p99")]
    lines += ["", "End to end (ms):", "", f"| {label} | " + " | ".join(header) + " |",
              "| --- " * (len(header) + 1) + "|"]
    for s in summaries:
        lines.append(f"| {s.users} | " + " | ".join(_cell(s.e2e(rpc), p) for rpc in plan.rpcs for p in ("p50", "p99"))
                     + " |")
    return "\n".join(lines) + "\n"


def knee_line(knee: int | None) -> str:
    if knee is None:
        return "No knee: throughput (successful requests/s) grew by 10% or more at every step.\n"
    return (f"Knee: throughput (successful requests/s) stops growing (under 10% more at the next user count) "
            f"at {knee} users.\n")


def knee(summaries: list[RunSummary]) -> int | None:
    """The user count after which the next adds under 10% successful requests per second."""
    ordered = sorted(summaries, key=lambda s: s.users)
    for before, after in zip(ordered, ordered[1:]):
        if after.success_throughput < 1.10 * before.success_throughput:
            return before.users
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(prefix: Path, out: Path, replicas_csv: Path | None = None) -> None:
    """Each call's median latency (and a stream's time to first byte), each
    service's requests/s with the users running, and, with ``replicas_csv``,
    each deployment's target and running replicas, over the run."""
    plt = _pyplot()
    with open(f"{prefix}_stats_history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    start = min((int(r["Timestamp"]) for r in rows), default=0)  # a run of a second or two may have no call's row
    users = sorted({int(r["Timestamp"]) - start: int(r["User Count"])
                    for r in rows if r["Name"] == "Aggregated"}.items())
    rows = [r for r in rows if r["Name"] != "Aggregated"]
    samples = replicas.read(replicas_csv) if replicas_csv else []
    panels = 3 if samples else 2
    figure, axes = plt.subplots(panels, 1, figsize=(8, 3 * panels), sharex=True)
    latency_axes, rate_axes = axes[0], axes[1]
    latency_axes.set_prop_cycle(color=plt.cm.tab20.colors)
    lines = [(name, "50%", f"{name.rpartition('/')[2]} p50") for name in _calls(dict.fromkeys(r["Name"] for r in rows))]
    lines += [(STREAM + TTFB, percentile, f"TTFB {percentile}") for percentile in PERCENTILES]
    for name, percentile, legend in lines:
        points = [(int(r["Timestamp"]) - start, float(r[percentile])) for r in rows
                  if r["Name"] == name and r[percentile] not in ("N/A", "")]
        if points:
            latency_axes.plot(*zip(*points), label=legend)
    latency_axes.set_ylabel("ms")
    latency_axes.set_yscale("log")
    latency_axes.legend(fontsize="small")
    per_service: dict[str, dict[int, float]] = {}
    for r in rows:
        if not r["Name"].endswith(DERIVED):
            service = r["Name"].split("/")[1].rpartition(".")[2]
            second = int(r["Timestamp"]) - start
            per_second = per_service.setdefault(service, {})
            per_second[second] = per_second.get(second, 0.0) + float(r["Requests/s"])
    for service, per_second in per_service.items():
        rate_axes.plot(*zip(*sorted(per_second.items())), label=service)
    rate_axes.set_ylabel("requests/s")
    rate_axes.legend(fontsize="small", loc="upper left")
    if users:
        user_axes = rate_axes.twinx()
        user_axes.step(*zip(*users), where="post", color="grey", linestyle=":", label="users")
        user_axes.set_ylabel("users")
        user_axes.legend(fontsize="small", loc="upper right")
    if samples:
        _plot_replicas(axes[2], samples, start)
    axes[-1].set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)


def _plot_replicas(axes, samples: list[replicas.Sample], start: float) -> None:
    """Each deployment's running replicas (solid) and target (dashed) over time."""
    colours = iter(_pyplot().cm.tab10.colors * 4)
    for deployment in dict.fromkeys(s.deployment for s in samples):
        own = [s for s in samples if s.deployment == deployment]
        times = [s.timestamp - start for s in own]
        colour = next(colours)
        axes.step(times, [s.running for s in own], where="post", color=colour, label=f"{deployment} running")
        axes.step(times, [s.target for s in own], where="post", color=colour, linestyle="--", alpha=0.6,
                  label=f"{deployment} target")
    axes.set_ylabel("replicas")
    axes.set_ylim(0, max(max(s.running, s.target) for s in samples) + 1)
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize="x-small", ncol=2, loc="upper right")


def replicas_markdown(samples: list[replicas.Sample]) -> str:
    """Each deployment's fewest and most running replicas over the run, and the most it was told to run."""
    lines = ["", "| deployment | fewest running replicas | most running | most targeted |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {deployment} | {low} | {high} | {target} |"
              for deployment, (low, high, target) in replicas.ranges(samples).items()]
    return "\n".join(lines) + "\n"


def plot_sweep(summaries: list[RunSummary], out: Path, plan: Plan, label: str = "users") -> None:
    """Each RPC's end-to-end p50 and p99 (and a stream's time to first byte), and
    throughput in requests/s and each unit, against users (or replicas)."""
    plt = _pyplot()
    ordered = sorted(summaries, key=lambda s: s.users)
    x = [s.users for s in ordered]
    figure, (latency_axes, rate_axes) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    series = [(rpc, [s.e2e(rpc) for s in ordered]) for rpc in plan.rpcs]
    if "GenerateStream" in plan.rpcs:
        series.append(("TTFB", [s.ttfb for s in ordered]))
    for (name, latencies), colour in zip(series, plt.cm.tab10.colors * 2):
        for field, style in (("p50", "-"), ("p99", "--")):
            latency_axes.plot(x, [getattr(latency, field) if latency else float("nan") for latency in latencies],
                              marker="o", linestyle=style, color=colour, label=f"{name} {field}")
    latency_axes.set_ylabel("ms")
    latency_axes.set_yscale("log")
    latency_axes.legend(fontsize="x-small", ncol=2)
    rate_axes.plot(x, [s.request_throughput for s in ordered], marker="o", label="requests/s")
    for unit in plan.units:
        rate_axes.plot(x, [s.throughput(unit) for s in ordered], marker="x", label=f"{unit}/s")
    rate_axes.set_ylabel("per second")
    rate_axes.set_yscale("log")
    rate_axes.legend(fontsize="small")
    rate_axes.set_xlabel(label)
    rate_axes.set_xscale("log", base=2)
    rate_axes.set_xticks(x, [str(value) for value in x])
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
