"""Where a benchmark or an evaluation is: one line on stderr as each phase starts and one with
its results as it ends, so a long run shows it is alive and what it has
measured so far (the full results come at the end, on stdout).

    phases = Phases("bench blt", total=7)
    with phases("incremental, batch 1") as phase:
        ...
        phase.result = f"{rate:.1f} bytes/s"

Each start line gives the run's elapsed time and an estimate of what is left:
the mean time of the phases so far times the phases still to run (none before
the first has ended; phases differ, so it is a rough guide).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Phase:
    name: str
    result: str = ""


class Phases:
    def __init__(self, what: str, total: int, stream=None):
        self.what, self.total, self.stream = what, total, stream or sys.stderr
        self.done = 0
        self.started = time.perf_counter()

    def _say(self, line: str) -> None:
        print(f"[{self.what}] {line}", file=self.stream, flush=True)

    @contextmanager
    def __call__(self, name: str):
        elapsed = time.perf_counter() - self.started
        left = f", about {elapsed / self.done * (self.total - self.done):.0f} s left" if self.done else ""
        self._say(f"phase {self.done + 1}/{self.total}: {name} (at {elapsed:.0f} s{left})")
        phase, began = Phase(name), time.perf_counter()
        yield phase
        self.done += 1
        took = time.perf_counter() - began
        measured = f": {phase.result}" if phase.result else ""
        self._say(f"phase {self.done}/{self.total} done in {took:.1f} s: {name}{measured}")
