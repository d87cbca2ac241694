"""The replicas of every deployment over a load test: once a second, what Ray
Serve is heading for (``target``: the autoscaler's decision, or the fixed
count) and what serves (``running``), read from the controller
(``ops.replica_counts``) and written beside Locust's files as
``<prefix>_replicas.csv``, drawn under the run's latency.

The reading runs in a process of its own (``recording``): a process that has
made gRPC calls of its own, as the runner has, cannot join the Ray cluster.

    python -m patchwork.loadtests.replicas OUT.csv [--interval-s 1]

records until it is sent SIGTERM or SIGINT, one line per deployment and
reading, written as it goes.
"""

from __future__ import annotations

import argparse
import csv
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("timestamp", "deployment", "target", "running")
READY = "recording"
# How long joining the cluster may take on a busy machine.
JOIN_TIMEOUT_S = 120.0


class RecorderError(Exception):
    """The replicas cannot be read (no Ray cluster on this machine, say)."""


@dataclass
class Sample:
    timestamp: float  # Unix time, as Locust's history has it
    deployment: str
    target: int
    running: int


def beside(prefix: Path) -> Path:
    """Where a run's replicas go: beside its Locust files."""
    return Path(f"{prefix}_replicas.csv")


@contextmanager
def recording(path: Path) -> Iterator[None]:
    """Records the replicas into ``path`` while the block runs."""
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen([sys.executable, "-m", "patchwork.loadtests.replicas", str(path)],
                                   stdout=subprocess.PIPE, stderr=errors, text=True)
        # It says READY once it has joined the cluster and read the counts.
        answered = select.select([process.stdout], [], [], JOIN_TIMEOUT_S)[0]
        line = process.stdout.readline() if answered else None
        if line is None or line.strip() != READY:
            process.kill()
            process.wait(timeout=60)
            errors.seek(0)
            said = errors.read().strip().splitlines()
            reason = said[-1] if said else (f"no answer in {JOIN_TIMEOUT_S:.0f} s" if line is None
                                            else f"exit status {process.returncode}")
            raise RecorderError(f"--record-replicas: the replicas cannot be read ({reason})")
        try:
            yield
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def read(path: Path) -> list[Sample]:
    with open(path, newline="") as f:
        return [Sample(float(row["timestamp"]), row["deployment"], int(row["target"]), int(row["running"]))
                for row in csv.DictReader(f)]


def ranges(samples: list[Sample]) -> dict[str, tuple[int, int, int]]:
    """Deployment -> (fewest running, most running, most targeted) replicas over the recording."""
    seen: dict[str, tuple[int, int, int]] = {}
    for s in samples:
        low, high, target = seen.get(s.deployment, (s.running, s.running, s.target))
        seen[s.deployment] = (min(low, s.running), max(high, s.running), max(target, s.target))
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m patchwork.loadtests.replicas", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--interval-s", type=float, default=1.0)
    args = parser.parse_args(argv)
    from patchwork.serving import ops

    try:
        counts = ops.replica_counts()
    except Exception as e:  # no cluster to join: the runner reports it
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # after joining: Ray sets handlers of its own
        signal.signal(signum, lambda *_: stopping.set())
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        print(READY, flush=True)
        while True:
            now = time.time()
            writer.writerows((f"{now:.3f}", name, c["target"], c["running"]) for name, c in counts.items())
            f.flush()
            if stopping.wait(args.interval_s):
                return 0
            try:
                counts = ops.replica_counts()
            except Exception as e:  # a busy controller: this second has no reading, the next may
                print(f"replica counts not read: {e}", file=sys.stderr)
                counts = {}


if __name__ == "__main__":
    sys.exit(main())
