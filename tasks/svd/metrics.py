"""The measurements of analysis.md §1-§3 as plain tensor functions, in the order of the spec.

No I/O here: every function takes matrices and factors already in the compute dtype
(float64 on CPU, float32 on CUDA) on the compute device. Indices are 0-based; top-k =
{0..k-1}, tail-k = {r-k..r-1}; r = min(m, n).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

KSpec = int | float

# skip_reason values (§6): each names a validity rule and the columns it leaves null.
K_GE_R = "k >= min(m,n)"  # angles, chordal, proj_dist (§3.3)
K_GT_R = "k > min(m,n)"  # additionally every top-k column: drift, energy, alignment, gap
DW_ZERO = "dW == 0"  # energy split (weights), delta_cosine (deltas) (§3.5, §3.7)
K_GT_DELTA_RANK = "k > numerical rank of dW"  # angles, chordal, alignment of deltas (§3.7)

NOISE_SEED = 0  # §3.8: the noise control is seeded; each matrix gets its own stream
INTRUDER_EPS = 0.5  # §3.6


# ---------------------------------------------------------------------------- §1 k-specs


def resolve_k(spec: KSpec, r: int) -> int:
    """§1: an int is absolute; a float f in (0, 1] is k = max(1, floor(f*r)) of the matrix's own r."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise TypeError(f"k-spec must be an int or a float, got {spec!r}")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"k-spec {spec}: an absolute k must be >= 1")
        return spec
    if not 0 < spec <= 1:
        raise ValueError(f"k-spec {spec}: a fraction must be in (0, 1]")
    # The decimal the user wrote, not its binary float: 0.29 * 100 is 28.999... in floats.
    return max(1, math.floor(Fraction(repr(spec)) * r))


def k_spec_str(spec: KSpec) -> str:
    return repr(spec)


# ---------------------------------------------------------------------------- §2 factors


@dataclass(frozen=True)
class Factors:
    """A thin SVD W = U diag(S) V^T of one m x n matrix as the cache holds it (§2): all r
    singular values (float64, descending) and the stored columns of U and V, the top
    `U_top.shape[1]` and the tail `U_tail.shape[1]` indices. `full` = every column stored."""

    S: Tensor
    U_top: Tensor
    V_top: Tensor
    U_tail: Tensor
    V_tail: Tensor
    m: int
    n: int

    @property
    def r(self) -> int:
        return min(self.m, self.n)

    @property
    def n_top(self) -> int:
        return self.U_top.shape[1]

    @property
    def n_tail(self) -> int:
        return self.U_tail.shape[1]

    @property
    def full(self) -> bool:
        return self.n_top == self.r

    @staticmethod
    def from_svd(U: Tensor, S: Tensor, Vh: Tensor, top: int | None = None, tail: int = 0) -> Factors:
        """Keep the top `top` (default all) and tail `tail` columns of a thin SVD."""
        m, n = U.shape[0], Vh.shape[1]
        r = min(m, n)
        top = r if top is None else min(top, r)
        tail = min(tail, r - top)
        V = Vh.mT
        return Factors(S.to(torch.float64), U[:, :top], V[:, :top], U[:, r - tail :], V[:, r - tail :], m, n)

    def top(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(U_k, sigma_k, V_k) for indices 0..k-1."""
        if k > self.n_top:
            raise ValueError(f"only the top {self.n_top} of {self.r} singular vectors are cached, {k} asked for: request more columns (tasks.svd.ColumnRequest)")
        return self.U_top[:, :k], self.S[:k], self.V_top[:, :k]

    def tail(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """(U, sigma, V) for indices r-k..r-1."""
        r = self.r
        if k == 0:
            return self.U_top[:, :0], self.S[:0], self.V_top[:, :0]
        if self.full:
            return self.U_top[:, r - k :], self.S[r - k :], self.V_top[:, r - k :]
        if k > self.n_tail:
            raise ValueError(f"only the last {self.n_tail} of {r} singular vectors are cached, {k} asked for: request more columns (tasks.svd.ColumnRequest)")
        return self.U_tail[:, self.n_tail - k :], self.S[r - k :], self.V_tail[:, self.n_tail - k :]


def numerical_rank(S: Tensor, m: int, n: int, dtype: torch.dtype) -> int:
    """§2: #{sigma_i > max(m, n) * eps(compute dtype) * sigma_0}."""
    if S.numel() == 0 or S[0] <= 0:
        return 0
    return int((S > max(m, n) * torch.finfo(dtype).eps * S[0]).sum())


def sigma_gap_rel(S: Tensor, k: int) -> float | None:
    """§2: (sigma_{k-1} - sigma_k) / sigma_{k-1} of the reference; how well the top-k span is defined."""
    if not 1 <= k < S.numel() or S[k - 1] <= 0:
        return None
    return float((S[k - 1] - S[k]) / S[k - 1])


# ---------------------------------------------------------------------------- §3.2 sigma drift


def sigma_drift(Sa: Tensor, Sb: Tensor, k: int, rank_a: int) -> dict[str, float | None]:
    """§3.2: delta_i = (sigma_i^b - sigma_i^a) / sigma_i^a over the reference's non-null indices
    (a prefix of length `rank_a`, since sigma is sorted); top-k statistics over i < k."""
    delta = ((Sb[:rank_a] - Sa[:rank_a]) / Sa[:rank_a]).cpu().numpy()
    top = delta[: min(k, rank_a)]
    out: dict[str, float | None] = {"sdrift_mean_abs_rel_all": float(np.abs(delta).mean()) if delta.size else None}
    if top.size:
        out |= {
            "sdrift_mean_abs_rel_topk": float(np.abs(top).mean()),
            "sdrift_median_abs_rel_topk": float(np.median(np.abs(top))),
            "sdrift_max_abs_rel_topk": float(np.abs(top).max()),
            "sdrift_mean_rel_topk": float(top.mean()),
        }
    else:
        out |= dict.fromkeys(("sdrift_mean_abs_rel_topk", "sdrift_median_abs_rel_topk", "sdrift_max_abs_rel_topk", "sdrift_mean_rel_topk"))
    return out


# ---------------------------------------------------------------------------- §3.3 principal angles


def principal_angles_cos(Qa: Tensor, Qb: Tensor) -> Tensor:
    """theta_i = arccos(min(s_i, 1)), s = svdvals(Qa^T Qb); ascending. Blind below sqrt(2 eps)."""
    s = torch.linalg.svdvals(Qa.mT @ Qb)  # descending -> angles ascending
    return torch.arccos(s.clamp(max=1.0))


def principal_angles_sin(Qa: Tensor, Qb: Tensor) -> Tensor:
    """theta_i = arcsin(min(t_i, 1)), t = svdvals(Qb - Qa (Qa^T Qb)) ascending. Poor near pi/2."""
    t = torch.linalg.svdvals(Qb - Qa @ (Qa.mT @ Qb)).flip(0)
    return torch.arcsin(t.clamp(max=1.0))


def principal_angles(Qa: Tensor, Qb: Tensor) -> Tensor:
    """§3.3 combined method: angles in radians, ascending, between span(Qa) and span(Qb)
    (d x k, orthonormal columns): the sine value where the cosine value is below pi/4."""
    if Qa.shape != Qb.shape or Qa.ndim != 2:
        raise ValueError(f"principal angles need two d x k bases of the same shape, got {tuple(Qa.shape)} and {tuple(Qb.shape)}")
    d, k = Qa.shape
    if not 1 <= k < d:
        # k = d: both spans are all of R^d and every angle is 0 whatever the data.
        raise ValueError(f"{K_GE_R}: principal angles need 1 <= k < d, got k={k}, d={d}")
    cos, sin = principal_angles_cos(Qa, Qb), principal_angles_sin(Qa, Qb)
    return torch.where(cos < math.pi / 4, sin, cos).sort().values


def top_k_angles(fa: Factors, fb: Factors, k: int) -> tuple[Tensor, Tensor]:
    """Angles between the top-k left (U) and right (V) singular subspaces of two matrices of
    the same shape. Validity (§3.3): 1 <= k < r on both sides, else ValueError."""
    if not 1 <= k < fa.r:
        raise ValueError(f"{K_GE_R}: top-k angles need 1 <= k < r, got k={k}, r={fa.r} ({fa.m}x{fa.n})")
    Ua, _, Va = fa.top(k)
    Ub, _, Vb = fb.top(k)
    return principal_angles(Ua, Ub), principal_angles(Va, Vb)


def n_forced_zero(k: int, d: int) -> int:
    """Two k-dim subspaces of R^d share >= 2k - d dimensions whatever the data."""
    return max(0, 2 * k - d)


def angle_summary(theta: Tensor, side: str) -> dict[str, float]:
    deg = np.degrees(theta.cpu().numpy())
    return {
        f"angle_{side}_mean_deg": float(deg.mean()),
        f"angle_{side}_median_deg": float(np.median(deg)),
        f"angle_{side}_p90_deg": float(np.percentile(deg, 90)),
        f"angle_{side}_max_deg": float(deg.max()),
    }


# ---------------------------------------------------------------------------- §3.4 distances


def proj_dist(theta: Tensor) -> float:
    """||Qa Qa^T - Qb Qb^T||_F = sqrt(2 sum sin^2 theta), without forming d x d projectors."""
    return math.sqrt(2 * float((torch.sin(theta) ** 2).sum()))


def chordal(theta: Tensor) -> float:
    """sqrt(sum sin^2 theta / k), in [0, 1]."""
    return math.sqrt(float((torch.sin(theta) ** 2).sum()) / theta.numel())


def chordal_rand(k: int, d: int) -> float:
    """The random-subspace level of `chordal`: E[sum sin^2]/k = 1 - k/d."""
    return math.sqrt(max(0.0, 1 - k / d))


# ---------------------------------------------------------------------------- §3.5 energy split


def energy_split(dW: Tensor, Ua: Tensor, Va: Tensor) -> tuple[float, float, float] | None:
    """§3.5 (stretch, rotation, outside) of dW against the reference's top-k bases; None if dW == 0.
    `outside` is computed directly (not as 1 - the others) so the sum is a real check."""

    def sq(x: Tensor) -> float:  # sums of squares accumulate in float64 even for fp32 inputs
        return float(x.square().sum(dtype=torch.float64))

    E = sq(dW)
    if E == 0.0:
        return None
    C = Ua.mT @ dW @ Va
    diag2, total2 = sq(C.diagonal()), sq(C)
    outside = sq(dW - Ua @ C @ Va.mT)
    parts = (diag2 / E, (total2 - diag2) / E, outside / E)
    tol = 1e-10 if dW.dtype == torch.float64 else 1e-5
    if abs(sum(parts) - 1) > tol:
        raise ArithmeticError(f"energy split sums to {sum(parts)!r}, not 1 within {tol} (stretch, rotation, outside = {parts})")
    return parts


# ---------------------------------------------------------------------------- §3.6 alignment


def alignment(Qa: Tensor, Qb: Tensor, eps: float = INTRUDER_EPS) -> tuple[float, float]:
    """(align, intruder_frac): M = |Qa^T Qb|; align = mean over reference vectors of the best
    |cos| with a target vector; intruder = share of target vectors whose best |cos| is < eps."""
    M = (Qa.mT @ Qb).abs()
    return float(M.max(dim=1).values.mean()), float((M.max(dim=0).values < eps).double().mean())


# ---------------------------------------------------------------------------- §3.7 deltas


def delta_cosine(D1: Tensor, D2: Tensor) -> float | None:
    """<dW1, dW2>_F / (||dW1|| ||dW2||); negative = the second update moves back along the first."""
    n1, n2 = float(torch.linalg.matrix_norm(D1)), float(torch.linalg.matrix_norm(D2))
    if n1 == 0 or n2 == 0:
        return None
    return float((D1 * D2).sum()) / (n1 * n2)


# ---------------------------------------------------------------------------- §3.8 noise control


def noise_seed(param: str, seed: int = NOISE_SEED) -> int:
    return seed * 1_000_003 + zlib.crc32(param.encode())


def noise_target(Wa: Tensor, dw_fro: float, param: str, seed: int = NOISE_SEED) -> Tensor:
    """W~ = Wa + G, G iid Gaussian with ||G||_F = ||dW||_F. Drawn on the CPU in float64 from a
    per-matrix seed, so the control is the same on every device and in every run."""
    gen = torch.Generator().manual_seed(noise_seed(param, seed))
    G = torch.randn(Wa.shape, generator=gen, dtype=torch.float64)
    G *= dw_fro / float(torch.linalg.matrix_norm(G))
    return Wa + G.to(Wa.device, Wa.dtype)


# ---------------------------------------------------------------------------- one comparison


# The metric columns of `svd_pair_metrics` after the ids (§6), in order.
METRIC_COLUMNS = (
    "ref_fro", "tgt_fro", "dw_fro", "dw_rel_fro",
    "sdrift_mean_abs_rel_topk", "sdrift_median_abs_rel_topk", "sdrift_max_abs_rel_topk", "sdrift_mean_rel_topk", "sdrift_mean_abs_rel_all",
    "angle_u_mean_deg", "angle_u_median_deg", "angle_u_p90_deg", "angle_u_max_deg",
    "angle_v_mean_deg", "angle_v_median_deg", "angle_v_p90_deg", "angle_v_max_deg",
    "n_forced_zero_u", "n_forced_zero_v", "chordal_u", "chordal_v", "proj_dist_u", "proj_dist_v", "chordal_rand_u", "chordal_rand_v",
    "energy_stretch", "energy_rotation", "energy_outside", "align_u", "align_v", "intruder_frac_u", "intruder_frac_v",
    "delta_cosine", "ref_numerical_rank", "tgt_numerical_rank", "sigma_gap_rel_at_k",
)  # fmt: skip


def _angle_columns(fa: Factors, fb: Factors, k: int) -> tuple[dict, tuple[Tensor, Tensor]]:
    theta_u, theta_v = top_k_angles(fa, fb, k)
    cols = angle_summary(theta_u, "u") | angle_summary(theta_v, "v")
    cols |= {"chordal_u": chordal(theta_u), "chordal_v": chordal(theta_v), "proj_dist_u": proj_dist(theta_u), "proj_dist_v": proj_dist(theta_v)}
    return cols, (theta_u, theta_v)


def _baseline_columns(k: int, m: int, n: int) -> dict:
    """What any two k-dim subspaces share: forced zeros and the random-subspace chordal level."""
    return {"n_forced_zero_u": n_forced_zero(k, m), "n_forced_zero_v": n_forced_zero(k, n), "chordal_rand_u": chordal_rand(k, m), "chordal_rand_v": chordal_rand(k, n)}


def _k_columns(fa: Factors, fb: Factors, k: int) -> dict:
    """Columns defined for any k <= r: the baselines, alignment and the reference's gap."""
    Ua, _, Va = fa.top(k)
    Ub, _, Vb = fb.top(k)
    align_u, intr_u = alignment(Ua, Ub)
    align_v, intr_v = alignment(Va, Vb)
    return _baseline_columns(k, fa.m, fa.n) | {
        "align_u": align_u, "align_v": align_v, "intruder_frac_u": intr_u, "intruder_frac_v": intr_v,
        "sigma_gap_rel_at_k": sigma_gap_rel(fa.S, k),
    }  # fmt: skip


@dataclass
class Measured:
    """One (comparison, matrix, k) result: the metric columns, the skip reasons and the
    combined angles (None where skipped)."""

    k: int
    k_spec: str
    columns: dict
    skip: list[str]
    theta_u: Tensor | None = None
    theta_v: Tensor | None = None

    @property
    def skip_reason(self) -> str | None:
        return "; ".join(self.skip) or None


def weight_metrics(Wa: Tensor, Wb: Tensor, fa: Factors, fb: Factors, k_specs: list[KSpec]) -> list[Measured]:
    """§3.2-§3.6 for a reference a and a target b of one matrix, one result per k-spec.
    Also the noise control (§3.8) with Wb = W~ and fb its factors."""
    m, n = Wa.shape
    r, dtype = min(m, n), Wa.dtype
    dW = Wb - Wa
    ref_fro, dw_fro = float(torch.linalg.matrix_norm(Wa)), float(torch.linalg.matrix_norm(dW))
    rank_a, rank_b = numerical_rank(fa.S, m, n, dtype), numerical_rank(fb.S, m, n, dtype)
    base = {
        "ref_fro": ref_fro, "tgt_fro": float(torch.linalg.matrix_norm(Wb)), "dw_fro": dw_fro,
        "dw_rel_fro": dw_fro / ref_fro if ref_fro > 0 else None,
        "ref_numerical_rank": rank_a, "tgt_numerical_rank": rank_b,
    }  # fmt: skip
    out = []
    for spec in k_specs:
        k = resolve_k(spec, r)
        res = Measured(k, k_spec_str(spec), dict(base), [])
        res.columns |= sigma_drift(fa.S, fb.S, k if k <= r else 0, rank_a)
        if k >= r:
            res.skip.append(K_GE_R)
        if k > r:
            res.skip.append(K_GT_R)
            out.append(res)
            continue
        if k < r:
            cols, (res.theta_u, res.theta_v) = _angle_columns(fa, fb, k)
            res.columns |= cols
        res.columns |= _k_columns(fa, fb, k)
        Ua, _, Va = fa.top(k)
        split = energy_split(dW, Ua, Va)
        if split is None:
            res.skip.append(DW_ZERO)
        else:
            res.columns |= dict(zip(("energy_stretch", "energy_rotation", "energy_outside"), split))
        out.append(res)
    return out


def delta_metrics(D1: Tensor, D2: Tensor, f1: Factors, f2: Factors, k_specs: list[KSpec]) -> list[Measured]:
    """§3.7: ΔW_1 (reference) vs ΔW_2 (target) of one matrix: angles between their top-k
    singular subspaces (k < r and k <= both numerical ranks), chordal, alignment, delta_cosine."""
    m, n = D1.shape
    r, dtype = min(m, n), D1.dtype
    rank_1, rank_2 = numerical_rank(f1.S, m, n, dtype), numerical_rank(f2.S, m, n, dtype)
    base = {
        "ref_fro": float(torch.linalg.matrix_norm(D1)), "tgt_fro": float(torch.linalg.matrix_norm(D2)),
        "delta_cosine": delta_cosine(D1, D2), "ref_numerical_rank": rank_1, "tgt_numerical_rank": rank_2,
    }  # fmt: skip
    out = []
    for spec in k_specs:
        k = resolve_k(spec, r)
        res = Measured(k, k_spec_str(spec), dict(base), [])
        if base["delta_cosine"] is None:
            res.skip.append(DW_ZERO)
        if k > r:
            res.skip += [K_GE_R, K_GT_R]
        elif k > min(rank_1, rank_2):
            res.skip.append(K_GT_DELTA_RANK)
            res.columns |= _baseline_columns(k, m, n)
        else:
            if k < r:
                cols, (res.theta_u, res.theta_v) = _angle_columns(f1, f2, k)
                res.columns |= cols
            else:
                res.skip.append(K_GE_R)
            res.columns |= _k_columns(f1, f2, k)
        out.append(res)
    return out
