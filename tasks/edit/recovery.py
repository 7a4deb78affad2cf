"""Recovery fraction with its paired bootstrap, and E5's damage fraction (analysis.md §4.4, §4.1).

Inputs are per-hand outcomes (1 = the hand was solved within the episode) of the edited
model, the donor and the target on the same hands in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# More than this share of resamples with acc_d <= acc_t: the donor-target gap is not
# significant and the interval is left null (§4.4).
MAX_NO_GAP = 0.025


def recovery_fraction(acc_edit: float, acc_donor: float, acc_target: float) -> float | None:
    """ρ = (acc_edit − acc_t) / (acc_d − acc_t); None if acc_d <= acc_t."""
    if acc_donor <= acc_target:
        return None
    return (acc_edit - acc_target) / (acc_donor - acc_target)


def damage_fraction(acc_edit: float, acc_donor: float, acc_target: float) -> float | None:
    """E5 (donor S, target R): (acc_R − acc_edit) / (acc_R − acc_S); None if acc_R <= acc_S."""
    if acc_target <= acc_donor:
        return None
    return (acc_target - acc_edit) / (acc_target - acc_donor)


@dataclass(frozen=True)
class Recovery:
    rho: float | None
    ci_low: float | None
    ci_high: float | None
    gap_significant: bool
    no_gap_share: float  # share of resamples with acc_d <= acc_t


def paired_bootstrap(edit: np.ndarray, donor: np.ndarray, target: np.ndarray, resamples: int = 2000, seed: int = 0) -> Recovery:
    """§4.4: ρ and its 95 % percentile interval from `resamples` resamples of the hands, the same
    hand indices for all three models. If more than 2.5 % of the resamples have acc_d <= acc_t
    the gap is not significant and the bounds are None; otherwise the interval is taken over
    the resamples where ρ is defined (acc_d > acc_t)."""
    edit, donor, target = (np.asarray(x, dtype=np.float64) for x in (edit, donor, target))
    if not (edit.shape == donor.shape == target.shape) or edit.ndim != 1 or edit.size == 0:
        raise ValueError(f"paired bootstrap needs three equal-length, non-empty per-hand vectors; got {edit.shape}, {donor.shape}, {target.shape}")
    rho = recovery_fraction(edit.mean(), donor.mean(), target.mean())
    idx = np.random.default_rng(seed).integers(0, edit.size, size=(resamples, edit.size))
    e, d, t = edit[idx].mean(1), donor[idx].mean(1), target[idx].mean(1)
    gap = d > t
    no_gap = float(1 - gap.mean())
    if rho is None or no_gap > MAX_NO_GAP:
        return Recovery(rho, None, None, False, no_gap)
    low, high = np.percentile((e[gap] - t[gap]) / (d[gap] - t[gap]), [2.5, 97.5])
    return Recovery(rho, float(low), float(high), True, no_gap)
