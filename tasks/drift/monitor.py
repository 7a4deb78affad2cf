"""The label-free stopping rule and the signals' correlations (issue 19; docs/monitor.md).

Plain functions of per-checkpoint series in step order (index 0 = the base). The rule reads
ID accuracy and a drift signal measured on prompts only; OOD accuracy enters nowhere but in
`spearman` and in the comparison the report makes afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

RHO = 0.5  # docs/monitor.md: an interval below half the best efficiency so far stops SFT
SIGNAL = "js"  # ... of this drift; both fixed before any result: other values are exploratory
RESAMPLES = 2000
SEED = 0


def efficiencies(id_accuracy: Sequence[float], drift: Sequence[float]) -> list[float | None]:
    """Per interval (i-1, i], i >= 1: ID accuracy gained per unit of drift added, Δa / Δd;
    None where the drift did not grow (Δd <= 0: no drift spent, nothing to judge)."""
    if len(id_accuracy) != len(drift):
        raise ValueError(f"efficiencies: {len(id_accuracy)} accuracies for {len(drift)} drift values")
    out: list[float | None] = []
    for i in range(1, len(drift)):
        da, dd = id_accuracy[i] - id_accuracy[i - 1], drift[i] - drift[i - 1]
        out.append(da / dd if dd > 0 else None)
    return out


def select(id_accuracy: Sequence[float], drift: Sequence[float], rho: float = RHO) -> int:
    """docs/monitor.md's rule: the checkpoint before the first interval whose efficiency
    falls below `rho` times the best efficiency of the intervals before it (once one has
    been positive); the last checkpoint if none does. Online, SFT could stop at the end of
    that interval: the rule reads nothing of later checkpoints."""
    best = None
    for i, e in enumerate(efficiencies(id_accuracy, drift), start=1):
        if e is None:
            continue
        if best is not None and best > 0 and e < rho * best:
            return i - 1
        best = e if best is None else max(best, e)
    return len(drift) - 1


def lowest(values: Sequence[float | None]) -> int | None:
    """Index of the smallest value (the first of ties); None if every value is missing."""
    present = [(v, i) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    return min(present)[1] if present else None


@dataclass(frozen=True)
class Correlation:
    rho: float
    ci_low: float
    ci_high: float
    n: int


def spearman(signal: Sequence[float], accuracy: Sequence[float], resamples: int = RESAMPLES, seed: int = SEED) -> Correlation:
    """Spearman's ρ of a signal with accuracy across checkpoints, with a 95 % percentile
    bootstrap interval over checkpoints (resamples in which either side is constant have no
    ρ and are left out; NaN throughout with fewer than 3 checkpoints or a constant side)."""
    x, y = np.asarray(signal, dtype=float), np.asarray(accuracy, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = len(x)
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(math.nan, math.nan, math.nan, n)
    rho = float(stats.spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(resamples):
        i = rng.integers(0, n, n)
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boot.append(stats.spearmanr(x[i], y[i]).statistic)
    low, high = np.percentile(boot, [2.5, 97.5]) if boot else (math.nan, math.nan)
    return Correlation(rho, float(low), float(high), n)
