"""Reads Locust's CSV files and writes the summary tables and plots."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from patchwork.loadtests.grpc_user import INTER_BYTE, TIME_PER_BYTE, TTFB

STREAM = "/patchwork.v1.ByteLM/GenerateStream"
UNARY = "/patchwork.v1.ByteLM/Generate"
SCORE = "/patchwork.v1.ByteLM/Score"
GENERATING = (STREAM, UNARY)
PERCENTILES = ("50%", "90%", "99%")


@dataclass
class Latency:
    mean: float
    p50: float
    p90: float
    p99: float
    count: int


@dataclass
class RunSummary:
    users: int
    seconds: float
    requests: int
    failures: int
    request_throughput: float
    byte_throughput: float
    ttfb: Latency | None
    time_per_byte: Latency | None
    inter_byte: Latency | None
    stream_e2e: Latency | None
    unary_e2e: Latency | None

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def _rows(stats_csv: Path) -> dict[str, dict]:
    with open(stats_csv, newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def _latency(row: dict | None) -> Latency | None:
    if row is None or int(row["Request Count"]) == 0:
        return None
    values = {p: float(row[p]) if row[p] not in ("", "N/A") else float("nan") for p in PERCENTILES}
    return Latency(float(row["Average Response Time"]), values["50%"], values["90%"], values["99%"],
                   int(row["Request Count"]))


def summarize(prefix: Path, users: int, seconds: float) -> RunSummary:
    """Summary of one Locust run whose CSV files start with ``prefix``."""
    rows = _rows(Path(f"{prefix}_stats.csv"))
    main = [row for name, row in rows.items() if name != "Aggregated" and not name.endswith((TTFB, TIME_PER_BYTE, INTER_BYTE))]
    requests = sum(int(r["Request Count"]) for r in main)
    failures = sum(int(r["Failure Count"]) for r in main)
    generated = sum(float(rows[n]["Average Content Size"]) * int(rows[n]["Request Count"]) for n in GENERATING if n in rows)
    return RunSummary(
        users=users, seconds=seconds, requests=requests, failures=failures,
        request_throughput=requests / seconds, byte_throughput=generated / seconds,
        ttfb=_latency(rows.get(STREAM + TTFB)), time_per_byte=_latency(rows.get(STREAM + TIME_PER_BYTE)),
        inter_byte=_latency(rows.get(STREAM + INTER_BYTE)), stream_e2e=_latency(rows.get(STREAM)),
        unary_e2e=_latency(rows.get(UNARY)),
    )


def _cell(latency: Latency | None, field: str) -> str:
    return "-" if latency is None else f"{getattr(latency, field):.1f}"


def markdown(summary: RunSummary, title: str) -> str:
    lines = [
        f"## {title}",
        "",
        f"{summary.users} users for {summary.seconds:.0f} s: {summary.requests} requests, "
        f"{summary.failures} failed (error rate {100 * summary.error_rate:.2f}%).",
        f"Request throughput {summary.request_throughput:.2f} requests/s; output throughput "
        f"{summary.byte_throughput:.1f} bytes/s.",
        "",
        "| latency (ms) | mean | p50 | p90 | p99 | samples |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, latency in [("time to first byte (stream)", summary.ttfb),
                          ("time per output byte (stream)", summary.time_per_byte),
                          ("inter-byte latency (stream)", summary.inter_byte),
                          ("end to end, GenerateStream", summary.stream_e2e),
                          ("end to end, Generate", summary.unary_e2e)]:
        count = "-" if latency is None else str(latency.count)
        lines.append(f"| {name} | " + " | ".join(_cell(latency, f) for f in ("mean", "p50", "p90", "p99"))
                     + f" | {count} |")
    return "\n".join(lines) + "\n"


def sweep_markdown(summaries: list[RunSummary], knee: int | None, label: str = "users") -> str:
    lines = [
        f"| {label} | requests/s | bytes/s | errors | TTFB p50 | TTFB p99 | e2e p50 | e2e p99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        lines.append(
            f"| {s.users} | {s.request_throughput:.2f} | {s.byte_throughput:.1f} | {100 * s.error_rate:.2f}% | "
            f"{_cell(s.ttfb, 'p50')} | {_cell(s.ttfb, 'p99')} | {_cell(s.stream_e2e, 'p50')} | "
            f"{_cell(s.stream_e2e, 'p99')} |"
        )
    if knee is not None:
        lines += ["", f"Knee: output throughput stops growing (under 10% more for twice the users) at {knee} users."]
    return "\n".join(lines) + "\n"


def knee(summaries: list[RunSummary]) -> int | None:
    """The user count after which doubling users adds under 10% byte throughput."""
    ordered = sorted(summaries, key=lambda s: s.users)
    for before, after in zip(ordered, ordered[1:]):
        if after.byte_throughput < 1.10 * before.byte_throughput:
            return before.users
    return None


def plot_history(prefix: Path, out: Path) -> None:
    """Latency percentiles of time to first byte, and throughput, over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    calls = (STREAM, UNARY, SCORE)
    with open(f"{prefix}_stats_history.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] in (STREAM + TTFB, *calls)]
    start = min(int(r["Timestamp"]) for r in rows)
    figure, (latency_axes, rate_axes) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ttfb = [r for r in rows if r["Name"] == STREAM + TTFB]
    for percentile in PERCENTILES:
        points = [(int(r["Timestamp"]) - start, float(r[percentile])) for r in ttfb if r[percentile] not in ("N/A", "")]
        if points:
            latency_axes.plot(*zip(*points), label=f"TTFB {percentile}")
    latency_axes.set_ylabel("ms")
    latency_axes.legend()
    per_second: dict[int, float] = {}
    for r in rows:
        if r["Name"] in calls:
            second = int(r["Timestamp"]) - start
            per_second[second] = per_second.get(second, 0.0) + float(r["Requests/s"])
    if per_second:
        rate_axes.plot(*zip(*sorted(per_second.items())))
    rate_axes.set_ylabel("requests/s")
    rate_axes.set_xlabel("seconds")
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)


def plot_sweep(summaries: list[RunSummary], out: Path, label: str = "users") -> None:
    """Latency percentiles and throughput against users (or replicas)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(summaries, key=lambda s: s.users)
    x = [s.users for s in ordered]
    figure, (latency_axes, rate_axes) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for field in ("p50", "p90", "p99"):
        latency_axes.plot(x, [getattr(s.ttfb, field) if s.ttfb else float("nan") for s in ordered], marker="o",
                          label=f"TTFB {field}")
        latency_axes.plot(x, [getattr(s.stream_e2e, field) if s.stream_e2e else float("nan") for s in ordered],
                          marker="x", linestyle="--", label=f"end to end {field}")
    latency_axes.set_ylabel("ms")
    latency_axes.legend(fontsize="small")
    rate_axes.plot(x, [s.byte_throughput for s in ordered], marker="o")
    rate_axes.set_ylabel("output bytes/s")
    rate_axes.set_xlabel(label)
    rate_axes.set_xscale("log", base=2)
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
