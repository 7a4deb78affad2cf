"""Outcome labels (GP §7.2)."""

from __future__ import annotations

# Fixed order: tables and summaries list the outcome columns in this order.
OUTCOMES = ("correct", "partial", "no_solution", "incorrect_number", "illegal_formula", "aggregated_error")

_OUTCOME_OF_REWARD = {5: "correct", 1: "partial", -1: "no_solution", -2: "incorrect_number", -3: "illegal_formula"}


def outcome_of(reward: float) -> str:
    """Bin a reward as the authors' statistics did (GP §7.2): the five single-rule values
    get their own label, everything else (0, -4, -5, ...) is `aggregated_error`."""
    return _OUTCOME_OF_REWARD.get(reward, "aggregated_error")
