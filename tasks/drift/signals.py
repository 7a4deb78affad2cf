"""The label-free signals of the drift stage (issue 19), as plain functions of tensors.

Two kinds, both on the same fixed prompts, both without the answers:
- next-token distributions at the answer anchor: forward KL(p_base ‖ p), reverse KL, JS
  (nats, temperature 1), top-k Jaccard, entropy, logit margin;
- final hidden states at the anchor: cosine per prompt, linear CKA, unbiased RBF-MMD²
  (analysis.md §5, exactly; its list of the authors' bugs is why `h` is checked against
  lm_head instead of normed again).
`recovery` and `win_rate` compare R and S against B (§5's recovery Δ).

Log-probabilities are fp32 or fp64 tensors of shape (N, V); hidden states (N, d). Every
function here is deterministic (MMD's subsample takes an explicit seed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LN2 = math.log(2.0)
MMD_ROWS = 512  # §5: at most 512 rows per side, a fixed seed
MMD_SEED = 0
JACCARD_KS = (1, 5, 10, 20, 50)  # §5's k = 1..50, at the points the tables keep
LM_HEAD_RTOL = 1e-3  # §5: lm_head(h) reproduces the logits to 1e-3 relative


# ---------------------------------------------------------------- the anchor's hidden state


def check_lm_head(h: torch.Tensor, logits: torch.Tensor, lm_head: torch.nn.Module, what: str) -> None:
    """§5: the final hidden state is what lm_head reads (HF's last hidden state already holds
    the final norm); a model whose lm_head(h) does not give its logits is refused rather than
    normed again."""
    again = lm_head(h.to(lm_head.weight.dtype)).float()
    err = (again - logits.float()).norm() / logits.float().norm().clamp_min(1e-30)
    if err > LM_HEAD_RTOL:
        raise ValueError(f"{what}: lm_head(last hidden state) differs from the logits by {err:.2e} relative (> {LM_HEAD_RTOL}): the hidden state is not the one lm_head reads")


# ---------------------------------------------------------------- next-token distributions


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row (nats), 0·log 0 = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def js(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per row (nats): ½KL(p‖m) + ½KL(q‖m), m = (p + q)/2."""
    logm = torch.logaddexp(logp, logq) - LN2
    return 0.5 * kl(logp, logm) + 0.5 * kl(logq, logm)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy per row (nats), 0·log 0 = 0."""
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def margin(logp: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit per row (log-probabilities differ from logits by a constant)."""
    top = logp.topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def topk_jaccard(logp: torch.Tensor, logq: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, |top-k(p) ∩ top-k(q)| / |top-k(p) ∪ top-k(q)| of the token ids."""
    a, b = logp.topk(k, dim=-1).indices, logq.topk(k, dim=-1).indices
    inter = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).double()
    return inter / (2 * k - inter)


def sequence_kl(logp_base: torch.Tensor, logp: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Per sequence, Σ_t KL(π_base(·|x, y<t) ‖ π(·|x, y<t)) over the scored positions of a
    teacher-forced answer y (the base's own greedy answer): (N, T, V) log-probs, (N, T) mask."""
    return (kl(logp_base, logp) * scored).sum(-1)


# ---------------------------------------------------------------- hidden states


def cosine(hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    """cos(h_x,i, h_y,i) per prompt."""
    return torch.nn.functional.cosine_similarity(hx.double(), hy.double(), dim=-1)


def quantiles(values: torch.Tensor) -> dict[str, float]:
    """mean, p10, p50, p90 (§5's summary of a per-prompt metric)."""
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {"mean": float(v.mean()), "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2])}


def linear_cka(hx: torch.Tensor, hy: torch.Tensor) -> float:
    """Linear CKA of centred features: ‖Xᵀ Y‖_F² / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F), in the Gram form
    ⟨XXᵀ, YYᵀ⟩ / (‖XXᵀ‖_F ‖YYᵀ‖_F) when there are fewer prompts than features (equal values,
    the smaller products)."""
    x, y = hx.double(), hy.double()
    x, y = x - x.mean(0), y - y.mean(0)
    if x.shape[0] < x.shape[1]:
        gx, gy = x @ x.T, y @ y.T
        num, den = (gx * gy).sum(), gx.norm() * gy.norm()
    else:
        num, den = (x.T @ y).norm() ** 2, (x.T @ x).norm() * (y.T @ y).norm()
    return float(num / den) if den > 0 else float("nan")


def subsample(h: torch.Tensor, rows: int = MMD_ROWS, seed: int = MMD_SEED) -> torch.Tensor:
    """At most `rows` rows, chosen by a seeded permutation (§5: never unseeded)."""
    if h.shape[0] <= rows:
        return h
    g = torch.Generator().manual_seed(seed)
    return h[torch.randperm(h.shape[0], generator=g)[:rows].sort().values]


def rbf_kernel(hx: torch.Tensor, hy: torch.Tensor, rows: int = MMD_ROWS, seed: int = MMD_SEED) -> tuple[torch.Tensor, int] | None:
    """The RBF kernel of the pooled subsamples (x first) and the number of x rows: k(a, b) =
    exp(−γ‖a − b‖²), γ = 1 / the median of the positive pairwise squared distances of the
    pooled sample. None when a side has fewer than 2 rows."""
    x, y = subsample(hx.double(), rows, seed), subsample(hy.double(), rows, seed)
    if min(len(x), len(y)) < 2:
        return None
    pooled = torch.cat([x, y])
    # the direct differences, not the |a|² + |b|² - 2ab shortcut, which loses digits on
    # nearby states
    d2 = torch.cdist(pooled, pooled, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
    upper = torch.triu_indices(len(d2), len(d2), offset=1)
    positive = d2[upper[0], upper[1]]
    positive = positive[positive > 0]
    if positive.numel() == 0:  # every row the same point: one constant kernel
        return torch.ones_like(d2), len(x)
    return torch.exp(-d2 / median(positive)), len(x)


def median(values: torch.Tensor) -> torch.Tensor:
    """The median of a 1-d tensor, the middle two's mean for an even count (torch.quantile's
    0.5, by two selections instead of its sort: a 1,000-row pooled sample has 500k distances)."""
    m = values.numel()
    upper = values.kthvalue(m // 2 + 1).values
    return upper if m % 2 else (values.kthvalue(m // 2).values + upper) / 2


def mmd2_of_kernel(k: torch.Tensor, in_x: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² of the kernel's rows split by the masks `in_x` (P, N) of 0/1, one per
    split: mean_{i≠j} k(x_i, x_j) + mean_{i≠j} k(y_i, y_j) − 2 mean_{i,j} k(x_i, y_j)."""
    in_x = in_x.to(k.dtype)
    in_y = 1.0 - in_x
    n, m = in_x.sum(1), in_y.sum(1)
    diag = k.diagonal()
    kx, ky = in_x @ k, in_y @ k

    def off_diagonal(side: torch.Tensor, ks: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return ((ks * side).sum(1) - side @ diag) / (count * (count - 1))

    return off_diagonal(in_x, kx, n) + off_diagonal(in_y, ky, m) - 2 * (kx * in_y).sum(1) / (n * m)


def rbf_mmd2(hx: torch.Tensor, hy: torch.Tensor, rows: int = MMD_ROWS, seed: int = MMD_SEED) -> float:
    """Unbiased RBF-MMD² (§5) of the two samples (`rbf_kernel`, `mmd2_of_kernel`). Can be
    slightly negative (unbiased); 0 when every row is the same point."""
    kernel = rbf_kernel(hx, hy, rows, seed)
    if kernel is None:
        return float("nan")
    k, n = kernel
    mask = torch.zeros((1, len(k)), dtype=k.dtype)
    mask[0, :n] = 1.0
    return float(mmd2_of_kernel(k, mask)[0])


def rbf_mmd2_permutation(hx: torch.Tensor, hy: torch.Tensor, permutations: int = 200, rows: int = MMD_ROWS, seed: int = MMD_SEED) -> tuple[float, float]:
    """(MMD², its permutation p-value): the share of `permutations` seeded relabellings of the
    pooled sample whose MMD² is at least the observed one, counting the observed labelling
    ((1 + #{≥}) / (1 + P)). The bandwidth is the pooled sample's, the same under every
    relabelling."""
    kernel = rbf_kernel(hx, hy, rows, seed)
    if kernel is None:
        return float("nan"), float("nan")
    k, n = kernel
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros((permutations + 1, len(k)), dtype=k.dtype)
    masks[0, :n] = 1.0
    for i in range(1, permutations + 1):
        masks[i, torch.randperm(len(k), generator=g)[:n]] = 1.0
    values = mmd2_of_kernel(k, masks)
    observed = values[0]
    # a relabelling equal to the observed up to rounding counts as at least it
    at_least = (values[1:] >= observed - 1e-12 * max(1.0, float(observed.abs()))).sum()
    return float(observed), float((1 + at_least) / (1 + permutations))


# ---------------------------------------------------------------- recovery (§5)

SIMILARITIES = frozenset({"cosine", "cka", "jaccard"})  # higher = closer; the rest are distances


def recovery(metric: str, bs: float, br: float) -> tuple[float, float]:
    """(Δ, Δ normalised by the (B, S) value): positive when R is closer to B than S is
    (similarity s: s(B,R) − s(B,S); distance δ: δ(B,S) − δ(B,R))."""
    delta = br - bs if metric.split("_")[0] in SIMILARITIES else bs - br
    return delta, (delta / abs(bs) if bs else float("nan"))


def win_rate(metric: str, bs: Sequence[float] | torch.Tensor, br: Sequence[float] | torch.Tensor) -> float:
    """Share of prompts where R is closer to B than S is (cosine higher, divergence lower);
    ties count one half."""
    bs, br = torch.as_tensor(bs, dtype=torch.float64), torch.as_tensor(br, dtype=torch.float64)
    closer = (br > bs) if metric.split("_")[0] in SIMILARITIES else (br < bs)
    return float((closer.double() + 0.5 * (br == bs).double()).mean())
