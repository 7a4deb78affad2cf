"""Outcome labels and Wilson intervals (GP §7.2, §9)."""

from __future__ import annotations

import math

# Fixed order: tables and summaries list the outcome columns in this order.
OUTCOMES = ("correct", "partial", "no_solution", "incorrect_number", "illegal_formula", "aggregated_error")

_OUTCOME_OF_REWARD = {5: "correct", 1: "partial", -1: "no_solution", -2: "incorrect_number", -3: "illegal_formula"}


def outcome_of(reward: float) -> str:
    """Bin a reward as the authors' statistics did (GP §7.2): the five single-rule values
    get their own label, everything else (0, -4, -5, ...) is `aggregated_error`."""
    return _OUTCOME_OF_REWARD.get(reward, "aggregated_error")


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    """Wilson 95 % interval of k successes in n trials (GP §9); (nan, nan) when n == 0."""
    if n == 0:
        return (math.nan, math.nan)
    # Imported here: the verifier imports this module and should not pay SciPy's import time.
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))
