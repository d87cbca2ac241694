"""Reading the study's curves through their noise: fitted curves, FLOPs
fractions per seed, and intervals over seeds.

A held-out curve is fitted with a power law in training FLOPs plus a floor,
``loss(F) = a + b * (F / F_max) ** -c`` (least squares, a, b >= 0, c in
(0, 4]), the usual form of a loss against compute. A MoT run's FLOPs fraction
is where its fitted curve first reaches the dense run's fitted final loss, as
a fraction of the dense run's FLOPs: none when it does not within them. A raw
first crossing of noisy points moves with every point near the target; a fit
reads all of them.

Over seeds, a quantity's interval is the mean plus or minus Student's t
(``CONFIDENCE``, n - 1 degrees of freedom) times its standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class PowerLaw:
    a: float  # the floor
    b: float
    c: float
    scale: float  # F_max: FLOPs are read relative to it

    def __call__(self, flops: float) -> float:
        return self.a + self.b * (flops / self.scale) ** -self.c

    def flops_at(self, loss: float) -> float | None:
        """The FLOPs where the curve comes down to ``loss`` (None: it never does)."""
        if loss <= self.a or self.b <= 0:
            return None
        return self.scale * ((loss - self.a) / self.b) ** (-1 / self.c)


def fit(flops: list[float], losses: list[float]) -> PowerLaw:
    x, y = np.asarray(flops, dtype=float), np.asarray(losses, dtype=float)
    scale = float(x.max())

    def law(f, a, b, c):
        return a + b * (f / scale) ** -c

    start = (max(0.0, float(y.min()) * 0.9), max(1e-3, float(y.max() - y.min())), 0.5)
    (a, b, c), _ = optimize.curve_fit(law, x, y, p0=start, bounds=([0, 0, 1e-3], [np.inf, np.inf, 4.0]),
                                      maxfev=20_000)
    return PowerLaw(float(a), float(b), float(c), scale)


def curve_fit(curve: list[dict], key: str) -> PowerLaw:
    return fit([point["flops"] for point in curve], [point[key] for point in curve])


def fitted_fraction(run: list[dict], dense: list[dict], key: str) -> float | None:
    """The fraction of the dense run's FLOPs at which ``run``'s fitted curve
    reaches the dense run's fitted final loss on ``key`` (None: not within them)."""
    total = dense[-1]["flops"]
    flops = curve_fit(run, key).flops_at(curve_fit(dense, key)(total))
    return None if flops is None or flops > total else flops / total


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n}


def interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` with its t interval (zero width for one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return Interval(mean, mean, mean, len(values))
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))
