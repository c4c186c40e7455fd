"""How sure a comparison over seeds is: Student-t intervals of a mean and of paired differences.

A study here trains each variant once per seed, and the seeds are the noise that matters (on the
synthetic data one rare class can swing a run by 2-3 mIoU). Two variants trained with the same
seeds are compared seed by seed: the paired difference removes what a seed does to both. With n
paired seeds, the 95% interval of the mean difference is ``mean ± t(0.975, n-1) · sd / sqrt(n)``;
an interval that excludes zero (or a target margin) says the seeds resolve the difference. Used by
``sdeseg tune``'s summary (rows over seeds, against a baseline) and by the study tools' tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values with its sample standard deviation and a two-sided Student-t
    interval at ``confidence``; ``sd``, ``low`` and ``high`` are None when n < 2."""

    n: int
    mean: float
    sd: float | None
    low: float | None
    high: float | None
    confidence: float = 0.95

    def resolves(self, margin: float = 0.0) -> str:
        """"above" when the whole interval lies above ``margin``, "below" when below it,
        "unresolved" when it straddles it or there is no interval (n < 2)."""
        if self.low is None or self.high is None:
            return "unresolved"
        return "above" if self.low > margin else "below" if self.high < margin else "unresolved"

    def format(self, digits: int = 2, signed: bool = True) -> str:
        """``mean [low, high]`` (or ``mean (n=1)``), e.g. ``-0.10 [-2.84, +2.65]`` (signed, for a
        difference) or ``31.36 [29.71, 33.01]``."""
        return f"{self.mean:{'+' if signed else ''}.{digits}f} {self.bounds(digits, signed)}"

    def bounds(self, digits: int = 2, signed: bool = True) -> str:
        """``[low, high]``, or ``(n=1)`` where there is no interval."""
        f = f"{'+' if signed else ''}.{digits}f"
        return f"(n={self.n})" if self.low is None else f"[{self.low:{f}}, {self.high:{f}}]"


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """The mean of ``values`` (at least one) and its Student-t interval at ``confidence``."""
    from scipy.stats import t

    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_interval: no values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"mean_interval: confidence must be in (0, 1), got {confidence}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return Interval(n, mean, None, None, None, confidence)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half, confidence)


def paired_difference(a: Mapping[Any, float], b: Mapping[Any, float],
                      confidence: float = 0.95) -> tuple[Interval, dict[Any, float]]:
    """``a − b`` seed by seed over the seeds both have: (interval of the mean difference, the
    per-seed differences in ``a``'s order). Raises ValueError when they share no seed."""
    shared = [k for k in a if k in b]
    if not shared:
        raise ValueError(f"paired_difference: no common seed ({sorted(map(str, a))} against {sorted(map(str, b))})")
    diffs = {k: float(a[k]) - float(b[k]) for k in shared}
    return mean_interval(list(diffs.values()), confidence), diffs
