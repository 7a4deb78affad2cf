"""The edits of analysis.md §4.1 as tensor functions: index sets, then E0 / E1 / E2 / E4.

No I/O here. W_t, W_d and the factors are in the compute dtype (float64 on CPU, float32 on
CUDA) on the compute device; the caller casts W' once to the parameter's dtype. E1, E2 and
E4 are low-rank corrections to W_t as read from the checkpoint, never a reconstruction of
it: only the |𝒯| selected triplets enter, so an edit of a few directions changes W_t by
exactly those directions and nothing else (no U Σ Vᵀ round-off elsewhere).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlheal.config import ConfigError
from tasks.svd.metrics import Factors, resolve_k

METHODS = ("copy", "swap_triplets", "swap_directions", "sv_only")
KSpec = int | float


def resolve_edit_k(spec: KSpec, r: int, reference_compat: bool = False) -> int:
    """A k-spec of an edit (§1, §4.1): an int is absolute (0 allowed, clamped later), a float in
    (0, 1] is max(1, ⌊f·r⌋). Quirk 2 (§4.2): reference_compat takes absolute integers only."""
    if isinstance(spec, float) and reference_compat:
        raise ConfigError(f"k-spec {spec!r}: reference_compat takes absolute integer k only (analysis.md §4.2 quirk 2); write e.g. 4096, not a fraction")
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 0:
            raise ValueError(f"k-spec {spec}: an absolute k must be >= 0")
        return spec
    return resolve_k(spec, r)


def index_set(k_top: int, k_tail: int, r: int) -> tuple[int, int]:
    """§4.1: k_top' = min(k_top, r), k_tail' = min(k_tail, r − k_top');
    𝒯 = {0, …, k_top'−1} ∪ {r−k_tail', …, r−1}. Returns (k_top', k_tail')."""
    top = min(k_top, r)
    return top, min(k_tail, r - top)


def triplets(f: Factors, k_top: int, k_tail: int) -> tuple[Tensor, Tensor, Tensor]:
    """(U_𝒯, σ_𝒯, V_𝒯): the top k_top columns then the tail k_tail columns, σ in U's dtype."""
    Ut, St, Vt = f.top(k_top)
    Ul, Sl, Vl = f.tail(k_tail)
    return torch.cat([Ut, Ul], 1), torch.cat([St, Sl]).to(Ut.dtype), torch.cat([Vt, Vl], 1)


def edit_matrix(
    method: str,
    W_t: Tensor,
    W_d: Tensor | None,
    f_t: Factors | None,
    f_d: Factors | None,
    k_top: int,
    k_tail: int,
    reference_compat: bool = False,
) -> Tensor:
    """W' of one matrix (the §4.1 table) for clamped (k_top', k_tail'):

        copy             W_d
        swap_triplets    W_t + U_d,𝒯 Σ_d,𝒯 V_d,𝒯ᵀ − U_t,𝒯 Σ_t,𝒯 V_t,𝒯ᵀ
        swap_directions  W_t + U_d,𝒯 Σ_t,𝒯 V_d,𝒯ᵀ − U_t,𝒯 Σ_t,𝒯 V_t,𝒯ᵀ
        sv_only          W_t + U_t,𝒯 (Σ_d,𝒯 − Σ_t,𝒯) V_t,𝒯ᵀ

    |𝒯| = 0 returns W_t itself for every method but copy. reference_compat (quirk 1): |𝒯| = r
    returns W_d itself in every method, so full-rank E2 / E4 equal E0. u and v are swapped
    jointly, so sign ambiguities cancel; mixed bases are left as they are (no re-orthogonalising)."""
    if method not in METHODS:
        raise ValueError(f"unknown edit method {method!r}; one of {METHODS}")
    r = min(W_t.shape)
    n = k_top + k_tail
    if method == "copy" or (reference_compat and n == r):
        if W_d is None:
            raise ValueError(f"{method}: the donor matrix is needed")
        return W_d
    if n == 0:
        return W_t
    U_t, S_t, V_t = triplets(f_t, k_top, k_tail)
    if method == "sv_only":
        S_d = torch.cat([f_d.S[:k_top], f_d.S[r - k_tail :]]).to(S_t)
        return W_t + (U_t * (S_d - S_t)) @ V_t.mT
    U_d, S_d, V_d = triplets(f_d, k_top, k_tail)
    sigma = S_d if method == "swap_triplets" else S_t
    return W_t + (U_d * sigma) @ V_d.mT - (U_t * S_t) @ V_t.mT
