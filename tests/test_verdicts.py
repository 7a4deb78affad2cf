"""The verdict rules (tasks/report.py, docs/verdicts.md): each one's false-positive rate and
power measured by simulation, and the defects of the old rules as failing cases.

A synthetic study is drawn from given per-checkpoint accuracies at 500 hands per split:
per-hand outcomes (1 = solved) of every checkpoint, independent across hands and, unless
said otherwise, across checkpoints (r = 0: the least favourable case for the paired
intervals, so the power below is a lower bound). The rates are measured on the rule
functions, vectorised over draws; `test_*_tables_agree` runs a few draws of each scenario
through the study tables the report reads (eval_summary, eval_attempts, sft_log,
checkpoints, svd_pair_metrics, checkpoint_roles, edit_eval_results, edit_variants) and
checks that `all_verdicts` reaches the same verdict.

    python tests/test_verdicts.py 2000     # the rates table of docs/verdicts.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats

from tasks import report
from tests.conftest import GP

HANDS = 500  # per split
DRAWS = 200  # per scenario in `make test`; the slow test and the script use more
FAST_RESAMPLES = 500  # bootstrap resamples per editing interval in `make test` (the stage: 2000)
MAX_FALSE = 0.05  # the most a rule may say "supported" with no effect
MIN_POWER = 0.8  # "supported in most draws" under the paper's effects, where the design allows it
DOCS = Path(__file__).resolve().parents[1] / "docs" / "verdicts.md"


# ---------------------------------------------------------------------------- the paper's numbers


def f1() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """paper_results.md §2.3 (F1, Llama): SFT steps > 0, OOD after SFT and after RL from there."""
    p = GP.paper_reference().curve
    sft = p.filter(pl.col("stage") == "sft").sort("sft_step")
    rl = p.filter(pl.col("stage") == "rl").sort("sft_step")
    joined = sft.join(rl, on="sft_step", suffix="_rl").filter(pl.col("sft_step") > 0)
    return joined["sft_step"].to_numpy(), joined["accuracy_pct"].to_numpy() / 100, joined["accuracy_pct_rl"].to_numpy() / 100


STEPS, OOD_SFT, OOD_RL = f1()
# ID: 24.79 % at B (step 140) and 68.38 % at the SFT end (F3); in between we draw a straight line.
ID_SFT = np.interp(STEPS, [90, 140, 1600], [0.20, 0.2479, 0.6838])
ACC_B, ACC_S = 0.1752, 0.0897  # F3: Premax and Moderate OOD, the editing claim's donor and target
FOUR_STARTS = np.isin(STEPS, [140, 500, 1100, 1400])  # a 4-start design like the toy's, across the paper's window
# Coarse 4-start designs (review D1): log-spaced, and evenly spaced from 400; the window
# (500-1100) may lie between tested starts, so their power is measured, not required.
COARSE = {"200, 400, 800, 1600": np.isin(STEPS, [200, 400, 800, 1600]), "400, 800, 1200, 1600": np.isin(STEPS, [400, 800, 1200, 1600])}


def draw(rng: np.random.Generator, p, draws: int, hands: int = HANDS, r: float = 0.0) -> np.ndarray:
    """Per-hand outcomes (draws, C, hands) of C models with accuracies p ((C,) or (draws, C));
    r = correlation of a shared latent hand difficulty (0: independent models)."""
    p = np.broadcast_to(np.asarray(p, dtype=np.float64), (draws, np.shape(p)[-1]))
    z = rng.standard_normal((draws, p.shape[1], hands))
    if r:
        z = np.sqrt(r) * rng.standard_normal((draws, 1, hands)) + np.sqrt(1 - r) * z
    return (z < stats.norm.ppf(p)[..., None]).astype(np.float64)


# ---------------------------------------------------------------------------- scenarios


def forgetting_draws(rng, ood_p, draws):
    return draw(rng, ood_p, draws), draw(rng, ID_SFT, draws)


def run_forgetting(rng, draws, effect):
    ood, idd = forgetting_draws(rng, OOD_SFT if effect else np.full(len(STEPS), 0.10), draws)
    return report.judge_forgetting(ood, idd, np.arange(HANDS) % 2)["status"]


CE_STEPS = np.arange(10, 1601, 10)


def ce_curves(rng, draws, effect):
    """OOD reference CE every 10 steps. Effect (the paper: "loss does not show the peak"): it
    keeps falling. Null: its minimum is at the true OOD peak (step 140)."""
    s = CE_STEPS.astype(np.float64)
    mean = 0.30 + 0.5 * np.exp(-s / 300) if effect else 0.40 + 0.10 * np.abs(np.log(s / 140))
    return mean + 0.003 * rng.standard_normal((draws, len(s)))


def run_loss(rng, draws, effect):
    ood, idd = forgetting_draws(rng, OOD_SFT, draws)
    f = report.judge_forgetting(ood, idd, np.arange(HANDS) % 2)
    saved = np.concatenate([[0], STEPS])
    return report.judge_loss(ood.sum(-1), HANDS, STEPS, saved, f["b"], f["drop_lo"] > 0, CE_STEPS, ce_curves(rng, draws, effect))["status"]


WINDOW_NULLS = {
    "no effect": lambda before: before,
    "heals from every start (+8 pp)": lambda before: before + 0.08,
    "gains grow with later starts (0 → +10 pp)": lambda before: before + np.linspace(0, 0.10, len(before)),
}


def window_draws(rng, draws, before_p, after_p):
    return draw(rng, before_p, draws), draw(rng, np.clip(after_p, 0, 1), draws)


def run_window(rng, draws, effect, starts=slice(None), null="no effect"):
    before_p = OOD_SFT[starts]
    after_p = OOD_RL[starts] if effect else WINDOW_NULLS[null](before_p)
    return report.judge_window(*window_draws(rng, draws, before_p, after_p))["status"]


# Rotation: weights are simulated directly (n x n, k-specs 0.125 and 0.25: k = 2 and 4). The
# paper gives σ drift (0.3-0.4 %) but no noise control, so the effect is a model of ours: SFT
# rotates B's top directions among the top 2k (U and V alike) by `ROT_EPS` per unit of σ,
# and stretches σ by 0.35 % on average. The null: the update is iid noise whose σ drift is
# the paper's 0.35 % (so only the comparison with the noise control can tell them apart).
ROT_N, ROT_MATRICES, ROT_KS, ROT_EPS = 16, 14, (2, 4), 0.01
ROT_NULL_REL = 0.003  # ||dW|| / ||W|| of the null update: median σ drift ≈ 0.35 % at n = 16


def svd(W):
    U, S, Vh = np.linalg.svd(W)
    return U, S, np.swapaxes(Vh, -1, -2)


def pair_columns(Wa, fa, Wb, fb) -> dict[str, np.ndarray]:
    """The svd_pair_metrics columns the rotation rule reads, for batches of matrices
    (analysis.md §3.2, §3.3 sine-based angles, §3.5); shape (..., len(ROT_KS)) per k."""
    Ua, Sa, Va = fa
    Ub, Sb, _ = fb
    dW = Wb - Wa
    E = (dW**2).sum((-2, -1))
    angle, rot, stretch = [], [], []
    for k in ROT_KS:
        Qa, Qb = Ua[..., :k], Ub[..., :k]
        t = np.linalg.svd(Qb - Qa @ (np.swapaxes(Qa, -1, -2) @ Qb), compute_uv=False)
        angle.append(np.degrees(np.arcsin(np.clip(t, 0, 1))).mean(-1))
        C = np.swapaxes(Qa, -1, -2) @ dW @ Va[..., :k]
        diag = (np.diagonal(C, axis1=-2, axis2=-1) ** 2).sum(-1)
        rot.append(((C**2).sum((-2, -1)) - diag) / E)
        stretch.append(diag / E)
    drift = np.abs((Sb - Sa) / Sa).mean(-1)
    return {"sdrift_mean_abs_rel_all": np.repeat(drift[..., None], len(ROT_KS), -1), "angle_u_mean_deg": np.stack(angle, -1), "energy_rotation": np.stack(rot, -1), "energy_stretch": np.stack(stretch, -1)}


def plus_noise(rng, W, norm):
    G = rng.standard_normal(W.shape)
    return W + G * (norm / np.sqrt((G**2).sum((-2, -1))))[..., None, None]


def rotated(rng, W, f, eps=ROT_EPS, drift=0.0035):
    U, S, V = f
    n, block = S.shape[-1], 2 * max(ROT_KS)
    A = np.zeros(W.shape)
    A[..., :block, :block] = rng.standard_normal(A[..., :block, :block].shape)
    A[..., np.arange(n), np.arange(n)] = 0
    stretch = 1 + drift * np.sqrt(np.pi / 2) * rng.standard_normal(S.shape)  # E|N(0, s)| = s·√(2/π)
    inner = eps * A * S[..., :, None] / np.sqrt(block) + np.eye(n) * (S * stretch)[..., None, :]
    return U @ inner @ np.swapaxes(V, -1, -2)


def rotation_draws(rng, draws, effect):
    """(update columns, noise-control columns) for `draws` studies of ROT_MATRICES matrices."""
    W = rng.standard_normal((draws, ROT_MATRICES, ROT_N, ROT_N)) / np.sqrt(ROT_N)
    f = svd(W)
    Ws = rotated(rng, W, f) if effect else plus_noise(rng, W, ROT_NULL_REL * np.sqrt((W**2).sum((-2, -1))))
    Wn = plus_noise(rng, W, np.sqrt(((Ws - W) ** 2).sum((-2, -1))))  # §3.8: the same ||dW||_F
    return pair_columns(W, f, Ws, svd(Ws)), pair_columns(W, f, Wn, svd(Wn))


def rotation_inputs(update, noise):
    geo = lambda c: np.exp(np.log(update[c] / noise[c]).mean(-1))  # noqa: E731
    return update["sdrift_mean_abs_rel_all"][..., 0], geo("angle_u_mean_deg"), geo("energy_rotation")


def run_rotation(rng, draws, effect):
    return report.judge_rotation(*rotation_inputs(*rotation_draws(rng, draws, effect)))["status"]


# Editing: donor B and target S at the paper's accuracies, each claimed variant an edit with
# recovery ρ; §4.4's paired bootstrap, vectorised.
MAX_NO_GAP = 0.025  # tasks/edit/recovery.py


def percentile(x: np.ndarray, q: float) -> np.ndarray:
    """np.percentile's linear interpolation over axis 0 among the non-NaN values of each
    column (np.nanpercentile, without its per-column Python loop)."""
    srt = np.sort(x, axis=0)  # NaN last
    m = (~np.isnan(x)).sum(0)
    pos = q / 100 * np.maximum(m - 1, 0)
    i = np.floor(pos).astype(int)
    a = np.take_along_axis(srt, i[None], 0)[0]
    b = np.take_along_axis(srt, np.minimum(i + 1, np.maximum(m - 1, 0))[None], 0)[0]
    return np.where(m > 0, a + (pos - i) * (b - a), np.nan)


def recovery_intervals(rng, edit, donor, target, resamples: int = 2000):
    """§4.4's percentile interval of ρ per draw (edit/donor/target: (D, H) outcomes). A
    resample of the hands is a multinomial draw of the counts of the 8 outcome patterns, the
    same distribution as resampling hand indices (checked against paired_bootstrap below)."""
    D, H = edit.shape
    code = (4 * edit + 2 * donor + target).astype(int)
    freq = np.stack([(code == c).mean(1) for c in range(8)], -1)
    counts = rng.multinomial(H, freq, size=(resamples, D))
    bits = np.array([[c >> 2 & 1, c >> 1 & 1, c & 1] for c in range(8)], dtype=np.float64)
    means = counts @ bits / H
    e, d, t = means[..., 0], means[..., 1], means[..., 2]
    gap = d > t
    rho = np.where(gap, (e - t) / np.where(gap, d - t, 1.0), np.nan)
    lo, hi = percentile(rho, 2.5), percentile(rho, 97.5)
    ok = (donor.mean(1) > target.mean(1)) & (1 - gap.mean(0) <= MAX_NO_GAP)
    return np.where(ok, lo, np.nan), np.where(ok, hi, np.nan)


def edit_draws(rng, draws, rho, variants=2, r=0.0, resamples=2000, hands=HANDS):
    """Donor, target and `variants` edits with recovery rho, drawn jointly (latent r)."""
    y = draw(rng, [ACC_B, ACC_S] + [ACC_S + rho * (ACC_B - ACC_S)] * variants, draws, hands, r=r)
    donor, target, edits = y[:, 0], y[:, 1], y[:, 2:]
    bounds = [recovery_intervals(rng, edits[:, v], donor, target, resamples) for v in range(variants)]
    return np.stack([b[0] for b in bounds], 1), np.stack([b[1] for b in bounds], 1), (edits, donor, target)


def run_monitor(rng, draws, effect, same=False):
    """Nulls: the monitor and the loss rules pick checkpoints of equal OOD accuracy, three
    different ones, or (`same`, the usual case: both loss rules pick the last step) two, so
    that "both lower ends > 0" is one comparison. Effect: the monitor picks F1's peak and
    both loss rules its last step."""
    if effect or same:
        o = draw(rng, [OOD_SFT.max(), OOD_SFT[-1]] if effect else [0.10, 0.10], draws)
        return report.judge_monitor(o[:, 0], o[:, [1, 1]])["status"]
    o = draw(rng, [0.10, 0.10, 0.10], draws)
    return report.judge_monitor(o[:, 0], o[:, 1:])["status"]


def run_edit(rng, draws, resamples, rho, question, r=0.0):
    lo, hi, _ = edit_draws(rng, draws, rho, r=r, resamples=resamples)
    return report.judge_recovery(lo, hi)[question]


# (rule, scenario) -> (statuses of `draws` synthetic studies, the paper's effect?, the least
# share of "supported" required under that effect (MIN_POWER unless the design cannot give
# it), run in `make test`? The others run in the slow test and the script only.)
SCENARIOS = {
    ("forgetting", "flat OOD at 10 % (B = arg-max of 17 equal checkpoints), ID rising"): (lambda g, n, b: run_forgetting(g, n, False), False, None, True),
    ("forgetting", "paper: OOD F1 (17.5 % → 6.8 %), ID 24.8 → 68.4 %"): (lambda g, n, b: run_forgetting(g, n, True), True, MIN_POWER, True),
    ("loss", "OOD as F1; CE minimum at the OOD peak (step 140)"): (lambda g, n, b: run_loss(g, n, False), False, None, True),
    ("loss", "paper: OOD as F1; CE keeps falling"): (lambda g, n, b: run_loss(g, n, True), True, MIN_POWER, True),
    **{("window", f"17 starts (F1 steps): {k}"): ((lambda k: lambda g, n, b: run_window(g, n, False, null=k))(k), False, None, True) for k in WINDOW_NULLS},
    **{("window", f"4 starts (140, 500, 1100, 1400): {k}"): ((lambda k: lambda g, n, b: run_window(g, n, False, FOUR_STARTS, k))(k), False, None, True) for k in WINDOW_NULLS},
    ("window", "paper: 17 starts, RL as F1"): (lambda g, n, b: run_window(g, n, True), True, MIN_POWER, True),
    ("window", "paper: 4 starts (140, 500, 1100, 1400), RL as F1"): (lambda g, n, b: run_window(g, n, True, FOUR_STARTS), True, MIN_POWER, True),
    ("rotation", f"update = iid noise ({ROT_MATRICES} matrices {ROT_N}x{ROT_N}, median σ drift 0.35 %)"): (lambda g, n, b: run_rotation(g, n // 4, False), False, None, True),
    ("rotation", "rotation among the top 2k directions, σ drift 0.35 %"): (lambda g, n, b: run_rotation(g, n // 4, True), True, MIN_POWER, True),
    ("edit_some", "ρ = 0 (B 17.5 %, S 9.0 %, two variants)"): (lambda g, n, b: run_edit(g, n, b, 0.0, "some"), False, None, True),
    ("edit_some", "paper: ρ = 0.75, independent models"): (lambda g, n, b: run_edit(g, n, b, 0.75, "some"), True, 0.7, True),
    ("edit_some", "paper: ρ = 0.75, models correlated per hand (r = 0.5)"): (lambda g, n, b: run_edit(g, n, b, 0.75, "some", r=0.5), True, MIN_POWER, False),
    ("edit_most", "ρ = 0"): (lambda g, n, b: run_edit(g, n, b, 0.0, "most"), False, None, False),
    ("edit_most", "ρ = 0.5 (the boundary)"): (lambda g, n, b: run_edit(g, n, b, 0.5, "most"), False, None, True),
    ("edit_most", "ρ = 0.5 (the boundary), r = 0.5"): (lambda g, n, b: run_edit(g, n, b, 0.5, "most", r=0.5), False, None, False),
    # More than 500 hands can show (docs/verdicts.md): measured and printed, not required.
    ("edit_most", "paper: ρ = 0.75, independent models"): (lambda g, n, b: run_edit(g, n, b, 0.75, "most"), True, 0.0, False),
    ("edit_most", "paper: ρ = 0.75, r = 0.5"): (lambda g, n, b: run_edit(g, n, b, 0.75, "most", r=0.5), True, 0.0, False),
    # Appended (seeds follow the position): coarse designs, measured and printed, not required.
    **{("window", f"4 starts ({k}): no effect"): ((lambda m: lambda g, n, b: run_window(g, n, False, m))(m), False, None, False) for k, m in COARSE.items()},
    **{("window", f"paper: 4 starts ({k}), RL as F1"): ((lambda m: lambda g, n, b: run_window(g, n, True, m))(m), True, 0.0, False) for k, m in COARSE.items()},
    # Issue 19, appended: the monitor's pick against the two loss rules' picks.
    ("monitor", "the three picks equally good (three checkpoints at 10 %)"): (lambda g, n, b: run_monitor(g, n, False), False, None, True),
    ("monitor", "the monitor picks F1's OOD peak (17.5 %), both loss rules its last step (6.8 %)"): (lambda g, n, b: run_monitor(g, n, True), True, MIN_POWER, True),
    ("monitor", "two equally good picks, both loss rules on one checkpoint (10 %)"): (lambda g, n, b: run_monitor(g, n, False, same=True), False, None, True),
}


def rates(draws: int, seed: int = 0, resamples: int = 2000) -> dict[tuple[str, str], dict[str, float]]:
    out = {}
    for i, (key, (run, *_)) in enumerate(SCENARIOS.items()):
        s = run(np.random.default_rng([seed, i]), draws, resamples)
        out[key] = {w: float((s == c).mean()) for c, w in report.WORDS.items()}
    return out


def rates_markdown(draws: int) -> str:
    lines = ["| rule | scenario | effect | supported | inconclusive | not supported |", "|---|---|---|---|---|---|"]
    for (rule, name), r in rates(draws).items():
        effect = SCENARIOS[(rule, name)][1]
        lines.append(f"| {rule} | {name} | {'paper' if effect else 'none'} | {100 * r['supported']:.1f} % | {100 * r['inconclusive']:.1f} % | {100 * r['not supported']:.1f} % |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the rates


FAST = [key for key, v in SCENARIOS.items() if v[3]]


@pytest.mark.parametrize("key", FAST, ids=[f"{r}: {n}" for r, n in FAST])
def test_rate_of_supported_without_and_with_the_papers_effect(key):
    run, effect, floor, _ = SCENARIOS[key]
    s = run(np.random.default_rng(list(SCENARIOS).index(key)), DRAWS, FAST_RESAMPLES)
    share = float((s == report.SUPPORTED).mean())
    if not effect:
        # DRAWS = 200: a true rate of 5 % exceeds 8 % with probability < 3 %; the rules' null
        # rates are at most 2.5 % by construction, so 8 % fails only a broken rule.
        assert share <= 0.08, f"{key}: 'supported' in {share:.1%} of draws without an effect"
    else:
        assert share >= floor, f"{key}: 'supported' in only {share:.1%} of draws with the paper's effect"


@pytest.mark.slow
def test_rates_with_many_draws():
    for key, r in rates(2000, seed=1).items():
        _, effect, floor, _ = SCENARIOS[key]
        assert r["supported"] <= MAX_FALSE if not effect else r["supported"] >= floor, (key, r)


def test_window_nulls_that_heal_read_not_supported():
    """Healing from every start, or gains growing with later starts (the toy's pattern), is no
    window: the verdict is "not supported" in most draws, not "inconclusive"."""
    for null in ("heals from every start (+8 pp)", "gains grow with later starts (0 → +10 pp)"):
        for starts in (slice(None), FOUR_STARTS):
            s = run_window(np.random.default_rng(7), DRAWS, False, starts, null)
            assert (s == report.NOT_SUPPORTED).mean() >= 0.8, (null, (s == report.NOT_SUPPORTED).mean())


# ---------------------------------------------------------------------------- the simulation is the report's


def test_wilson_is_the_eval_stages():
    from tasks.eval import wilson_interval

    for k, n in [(0, 500), (1, 500), (88, 500), (250, 500), (500, 500), (3, 16)]:
        lo, hi = report.wilson(np.array([k]), n)
        assert np.allclose([lo[0], hi[0]], wilson_interval(k, n), atol=1e-12), (k, n)


def test_vectorised_bootstrap_matches_paired_bootstrap():
    """The multinomial shortcut has the distribution of §4.4's index resampling: on the same
    outcomes the intervals agree within the Monte-Carlo error of 20000 resamples (the tails of
    a ratio: up to about 0.02 here; 0.04 allowed)."""
    from tasks.edit import paired_bootstrap

    rng = np.random.default_rng(3)
    for rho in (0.0, 0.75):
        _, _, (edits, donor, target) = edit_draws(rng, 2, rho, variants=1, resamples=10)
        lo, hi = recovery_intervals(rng, edits[:, 0], donor, target, resamples=20000)
        for i in range(2):
            ref = paired_bootstrap(edits[i, 0], donor[i], target[i], resamples=20000)
            if ref.ci_low is None:
                assert np.isnan(lo[i])
            else:
                assert abs(lo[i] - ref.ci_low) < 0.04 and abs(hi[i] - ref.ci_high) < 0.04, (lo[i], hi[i], ref)


def test_vectorised_pair_metrics_match_the_svd_stage():
    import torch

    from tasks.svd.metrics import Factors, weight_metrics

    for effect in (False, True):
        rng = np.random.default_rng(4 + effect)
        W = rng.standard_normal((ROT_N, ROT_N)) / np.sqrt(ROT_N)
        Ws = rotated(rng, W, svd(W)) if effect else plus_noise(rng, W, 0.01)
        mine = pair_columns(W, svd(W), Ws, svd(Ws))

        def factors(M):
            U, S, Vh = torch.linalg.svd(torch.from_numpy(M), full_matrices=False)
            return Factors.from_svd(U, S, Vh)

        ref = weight_metrics(torch.from_numpy(W), torch.from_numpy(Ws), factors(W), factors(Ws), [k / ROT_N for k in ROT_KS])
        for j, m in enumerate(ref):
            for c, v in mine.items():
                assert abs(v[j] - m.columns[c]) <= 1e-8 * max(1.0, abs(m.columns[c])), (c, m.k, v[j], m.columns[c])


# Study tables for one draw, shaped as the stages write them (only the columns the report reads).


def attempts_rows(ckpt: str, split: str, solved: np.ndarray, hands: np.ndarray | None = None) -> pl.DataFrame:
    hands = np.arange(len(solved)) if hands is None else hands
    return pl.DataFrame({"ckpt_id": ckpt, "split": split, "hand_index": hands, "attempt": 1, "reward": np.where(solved > 0, 5.0, -1.0), "response": ""}, schema_overrides={"attempt": pl.Int32})


def summary_rows(attempts: pl.DataFrame, meta: dict[str, tuple[str, int]]) -> pl.DataFrame:
    from tasks.eval import wilson_interval

    s = attempts.group_by("ckpt_id", "split", "hand_index").agg(solved=(pl.col("reward") == 5).any()).group_by("ckpt_id", "split").agg(n=pl.len(), k=pl.col("solved").sum())
    lo, hi = zip(*(wilson_interval(k, n) for k, n in zip(s["k"], s["n"])))
    return s.with_columns(
        stage=pl.col("ckpt_id").replace_strict({c: v[0] for c, v in meta.items()}),
        step=pl.col("ckpt_id").replace_strict({c: v[1] for c, v in meta.items()}).cast(pl.Int32),
        accuracy=pl.col("k") / pl.col("n"), accuracy_ci_low=pl.Series(lo), accuracy_ci_high=pl.Series(hi),
    )  # fmt: skip


def sft_study(ood: np.ndarray, idd: np.ndarray, steps=STEPS, ce: np.ndarray | None = None, ce_steps=CE_STEPS) -> dict[str, pl.DataFrame]:
    """eval_attempts / eval_summary / checkpoints / sft_log of one SFT run (no base row: its
    outcomes are all 0 and the rules read step > 0 only; the base is in the saved steps)."""
    ids = [f"sft-{s}" for s in steps]
    att = pl.concat([attempts_rows(c, "ood", ood[i]) for i, c in enumerate(ids)] + [attempts_rows(c, "id", idd[i]) for i, c in enumerate(ids)] + [attempts_rows("base", sp, np.zeros(ood.shape[1])) for sp in ("ood", "id")])
    meta = {c: ("sft", int(s)) for c, s in zip(ids, steps)} | {"base": ("base", 0)}
    t = {"eval_attempts": att, "eval_summary": summary_rows(att, meta), "checkpoints": pl.DataFrame({"ckpt_id": list(meta), "stage": [v[0] for v in meta.values()], "step": [v[1] for v in meta.values()], "parent": None, "rl_start_step": None}, schema_overrides={"parent": pl.String, "rl_start_step": pl.Int32})}
    if ce is not None:
        t["sft_log"] = pl.DataFrame({"step": ce_steps, "train_loss": 1.0, "ce_id": ce, "ce_ood": ce}, schema_overrides={"step": pl.Int32})
    return t


def rl_study(before: np.ndarray, after: np.ndarray, starts: np.ndarray, updates: int = 10) -> dict[str, pl.DataFrame]:
    sft = sft_study(before, before, starts)
    rl_ids = [f"rl-{s}-{updates}" for s in starts]
    att = pl.concat([sft["eval_attempts"]] + [attempts_rows(c, "ood", after[i]) for i, c in enumerate(rl_ids)])
    meta = {c: ("rl", updates) for c in rl_ids} | {f"sft-{s}": ("sft", int(s)) for s in starts} | {"base": ("base", 0)}
    rl = pl.DataFrame({"ckpt_id": rl_ids, "stage": "rl", "step": updates, "parent": [f"sft-{s}" for s in starts], "rl_start_step": starts}, schema_overrides={"step": pl.Int32, "rl_start_step": pl.Int32})
    return {"eval_attempts": att, "eval_summary": summary_rows(att, meta), "checkpoints": pl.concat([sft["checkpoints"], rl], how="vertical_relaxed")}


def svd_study(update: dict, noise: dict, other_noise: dict | None = None) -> dict[str, pl.DataFrame]:
    """checkpoint_roles and svd_pair_metrics of one draw: B→S, its noise control noise:B..S, and
    (as the svd stage also writes) B→R with its own noise control, given as `other_noise`."""
    from tasks.svd.engine import noise_id

    M = update["angle_u_mean_deg"].shape[0]
    rows = []
    for comparison, tgt, cols in [("weights", "sft-1600", update), ("noise_control", noise_id("sft-140", "sft-1600"), noise)] + ([("weights", "rl-1100-10", update), ("noise_control", noise_id("sft-140", "rl-1100-10"), other_noise)] if other_noise else []):
        for i in range(M):
            for j, k in enumerate(ROT_KS):
                rows.append({"comparison": comparison, "ref_id": "sft-140", "tgt_id": tgt, "param": f"model.layers.{i // 7}.m{i % 7}.weight", "k": k, "k_spec": repr(k / ROT_N), "skip_reason": None, **{c: float(v[i, j]) for c, v in cols.items()}})
    roles = pl.DataFrame({"role": ["base", "B", "S", "R"], "ckpt_id": ["base", "sft-140", "sft-1600", "rl-1100-10"], "stage": ["base", "sft", "sft", "rl"], "step": [0, 140, 1600, 10]})
    return {"svd_pair_metrics": pl.DataFrame(rows, schema_overrides={"skip_reason": pl.String}), "checkpoint_roles": roles}


def edit_study(lo: np.ndarray, hi: np.ndarray, rho: np.ndarray | None = None) -> dict[str, pl.DataFrame]:
    variants = pl.DataFrame([
        {"variant_id": "top", "experiment": "E2", "method": "swap_directions", "reference_compat": False, "k_top_spec": "0.2", "k_tail_spec": "0", "layers_spec": None, "n_matrices_edited": 14},
        {"variant_id": "quarter", "experiment": "E3", "method": "swap_directions", "reference_compat": False, "k_top_spec": "1.0", "k_tail_spec": "0", "layers_spec": "0-0.25", "n_matrices_edited": 7},
        {"variant_id": "e5", "experiment": "E5", "method": "swap_directions", "reference_compat": False, "k_top_spec": "0.2", "k_tail_spec": "0", "layers_spec": None, "n_matrices_edited": 14},
    ])  # fmt: skip
    rho = (lo + hi) / 2 if rho is None else rho
    ci = lambda x: None if np.isnan(x) else float(x)  # noqa: E731
    res = pl.DataFrame(
        [{"variant_id": v, "split": "OOD", "accuracy": 0.1, "recovery_fraction": float(rho[i]), "recovery_ci_low": ci(lo[i]), "recovery_ci_high": ci(hi[i])} for i, v in enumerate(["top", "quarter"])]
        + [{"variant_id": "e5", "split": "OOD", "accuracy": 0.1, "recovery_fraction": 0.9, "recovery_ci_low": 0.8, "recovery_ci_high": 1.0}],
        schema_overrides={"recovery_ci_low": pl.Float64, "recovery_ci_high": pl.Float64},
    )
    return {"edit_eval_results": res, "edit_variants": variants}


def verdicts(t: dict[str, pl.DataFrame]) -> dict[str, report.Verdict]:
    return report.all_verdicts(t, report.sft_accuracy(t, GP), report.rl_recovery(t, GP), GP)


def code(v: report.Verdict) -> int:
    return {w: c for c, w in report.WORDS.items()}[v.verdict]


def test_forgetting_and_loss_tables_agree():
    rng = np.random.default_rng(11)
    for effect in (False, True):
        ood, idd = forgetting_draws(rng, OOD_SFT if effect else np.full(len(STEPS), 0.10), 3)
        f = report.judge_forgetting(ood, idd, np.arange(HANDS) % 2)
        ce = ce_curves(rng, 3, effect)
        loss = report.judge_loss(ood.sum(-1), HANDS, STEPS, np.concatenate([[0], STEPS]), f["b"], f["drop_lo"] > 0, CE_STEPS, ce)
        for i in range(3):
            v = verdicts(sft_study(ood[i], idd[i], ce=ce[i]))
            assert code(v["forgetting"]) == f["status"][i] and code(v["loss"]) == loss["status"][i], (effect, i, v["forgetting"], v["loss"])
            assert abs(v["forgetting"].values["ood_drop"] - f["drop"][i]) < 1e-12


def test_window_tables_agree():
    rng = np.random.default_rng(12)
    for before_p, after_p in [(OOD_SFT, OOD_RL), (OOD_SFT, OOD_SFT + 0.08), (OOD_SFT[FOUR_STARTS], OOD_RL[FOUR_STARTS])]:
        before, after = window_draws(rng, 2, before_p, after_p)
        want = report.judge_window(before, after)["status"]
        starts = STEPS if len(before_p) == len(STEPS) else STEPS[FOUR_STARTS]
        for i in range(2):
            assert code(verdicts(rl_study(before[i], after[i], starts))["window"]) == want[i]


def test_rotation_tables_agree():
    rng = np.random.default_rng(13)
    for effect in (False, True):
        upd, noise = rotation_draws(rng, 3, effect)
        want = report.judge_rotation(*rotation_inputs(upd, noise))["status"]
        for i in range(3):
            one = lambda c: {k: v[i] for k, v in c.items()}  # noqa: E731
            got = verdicts(svd_study(one(upd), one(noise), {k: v[i] * 0.1 for k, v in noise.items()}))["rotation"]
            assert code(got) == want[i], (effect, got)


def test_edit_tables_agree():
    rng = np.random.default_rng(14)
    for rho in (0.0, 0.75):
        lo, hi, _ = edit_draws(rng, 5, rho, resamples=FAST_RESAMPLES)
        want = report.judge_recovery(lo, hi)
        for i in range(5):
            v = verdicts(edit_study(lo[i], hi[i]))
            assert (code(v["edit_some"]), code(v["edit_most"])) == (want["some"][i], want["most"][i])


def monitor_study(ood: np.ndarray, steps: list[int], picks: dict[str, int]) -> dict[str, pl.DataFrame]:
    """An SFT run's eval tables (outcomes ood (C, H) at `steps`) with the drift stage's picks
    (rule -> step), as drift_selection holds them."""
    t = sft_study(ood, ood, steps=steps)
    acc = dict(zip(steps, ood.mean(1)))
    t["drift_selection"] = pl.DataFrame(
        [{"rule": r, "ckpt_id": f"sft-{k}", "step": k, "accuracy_ood": float(acc[k]), "accuracy_id": 0.5, "signal": "js" if r == "monitor" else None, "rho": 0.5 if r == "monitor" else None} for r, k in picks.items()],
        schema={"rule": pl.String, "ckpt_id": pl.String, "step": pl.Int32, "accuracy_ood": pl.Float64, "accuracy_id": pl.Float64, "signal": pl.String, "rho": pl.Float64},
    )
    return t


def test_monitor_tables_agree():
    """all_verdicts reads drift_selection and eval_attempts as judge_monitor reads its arrays:
    the peak against the end (supported), the same checkpoint as a loss rule (a difference of
    0: not supported), and no drift stage (no data)."""
    rng = np.random.default_rng(15)
    o = draw(rng, [OOD_SFT.max(), 0.10, OOD_SFT[-1]], 3)
    for i in range(3):
        picks = {"monitor": 10, "lowest_id_ce": 30, "lowest_train_loss": 30, "last": 30}
        v = verdicts(monitor_study(o[i], [10, 20, 30], picks))["monitor"]
        want = report.judge_monitor(o[i, 0][None], o[i, [2, 2]][None])
        assert code(v) == want["status"][0] and v.values["monitor_step"] == 10
    same = verdicts(monitor_study(o[0], [10, 20, 30], {"monitor": 30, "lowest_id_ce": 30, "lowest_train_loss": 10}))["monitor"]
    assert same.verdict == "not supported" and "difference +0.0 pp [+0.0 pp, +0.0 pp]" in same.evidence
    assert verdicts(sft_study(o[0], o[0], steps=[10, 20, 30]))["monitor"].verdict == "no data"
    # another signal or threshold than the rule fixed in advance is exploratory: not judged
    t = monitor_study(o[0], [10, 20, 30], {"monitor": 10, "lowest_id_ce": 30, "lowest_train_loss": 30})
    t["drift_selection"] = t["drift_selection"].with_columns(signal=pl.when(pl.col("rule") == "monitor").then(pl.lit("mmd2")).otherwise(pl.col("signal")))
    v = verdicts(t)["monitor"]
    assert v.verdict == "no data" and "exploratory" in v.evidence


# ---------------------------------------------------------------------------- the old rules' defects


def test_a_peak_that_lives_on_one_half_of_the_hands_is_not_replicated():
    """B chosen on noise: one checkpoint solves 40 more hands than the others, all of them
    even-numbered. Chosen on the even half it is scored on the odd half, where it is no better
    than S; chosen on the odd half, the tie goes to the earlier checkpoint, equal to S. The old
    rule compared B's accuracy on the very hands that chose it with S's and said "supported"."""
    steps = np.array([10, 20, 30, 40, 50])
    base = np.zeros(HANDS)
    base[::10] = 1  # 50 hands, 10 %, solved by every checkpoint
    ood = np.tile(base, (5, 1))
    lucky = np.flatnonzero(base == 0)
    ood[2, lucky[lucky % 2 == 0][:40]] = 1  # step 30: 18 % on all hands
    idd = draw(np.random.default_rng(0), np.linspace(0.2, 0.7, 5), 1)[0]
    v = verdicts(sft_study(ood, idd, steps))["forgetting"]
    assert v.values["peak_step"] == 30 and abs(v.values["ood_peak"] - 0.18) < 1e-12
    assert v.verdict == "not supported", v  # held out, B is S: the drop is exactly 0
    assert v.values["ood_drop"] == 0 and v.values["ood_peak_held_out"] == 0.10


def test_forgetting_compares_id_with_intervals():
    """ID at S 0.4 pp above ID at B is no rise: the old rule compared the point estimates."""
    steps = np.array([10, 20])
    ood = np.zeros((2, HANDS))
    ood[0, :100] = 1  # 20 % at step 10
    ood[1, :20] = 1  # 4 % at the end: a clear drop
    idd = np.zeros((2, HANDS))
    idd[0, :200] = 1
    idd[1, 2:202] = 1  # 40.0 % → 40.0 %, different hands: the paired rise is 0 ± 0.4 pp
    idd[1, 202] = 1  # 40.2 %: above by one hand
    v = verdicts(sft_study(ood, idd, steps))["forgetting"]
    assert v.verdict == "inconclusive", v
    assert v.values["id_rise"] > 0 and v.values["id_rise_low"] < 0


def test_window_no_window_when_gains_grow_or_heal_everywhere():
    """Deterministic versions of the toy's pattern and of healing everywhere: 'not supported'
    (the old rule said 'inconclusive' for both)."""
    starts = np.array([40, 80, 160, 320])
    before = np.zeros((4, HANDS))
    before[:, :50] = 1  # 10 % at every start
    for gains in ([0, 10, 30, 60], [60, 60, 60, 60]):  # extra hands solved after RL
        after = before.copy()
        for i, g in enumerate(gains):
            after[i, 50 : 50 + g] = 1
        v = verdicts(rl_study(before, after, starts))["window"]
        assert v.verdict == "not supported", (gains, v)
    after = before.copy()
    after[1:3, 50:110] = 1  # a window: flat, healed (+12 pp), healed, hurt (−6 pp)
    after[3, 20:50] = 0
    assert verdicts(rl_study(before, after, starts))["window"].verdict == "supported"


def test_rotation_is_judged_against_the_same_pairs_noise_control():
    """B→S rotates less than its own noise control, but more than the B→R control (smaller
    update, smaller noise). The old rule averaged both controls and said "supported"; so did
    its `rotation > stretch` test, true for iid noise as well (the ratio is about k − 1)."""
    M = 14
    update = {"sdrift_mean_abs_rel_all": np.full((M, 2), 0.003), "angle_u_mean_deg": np.full((M, 2), 2.0), "energy_rotation": np.full((M, 2), 0.03), "energy_stretch": np.full((M, 2), 0.001)}
    own = {**update, "sdrift_mean_abs_rel_all": np.full((M, 2), 0.02), "angle_u_mean_deg": np.full((M, 2), 3.0), "energy_rotation": np.full((M, 2), 0.03)}
    other = {**own, "angle_u_mean_deg": np.full((M, 2), 0.2), "energy_rotation": np.full((M, 2), 0.001)}
    v = verdicts(svd_study(update, own, other))["rotation"]
    assert v.verdict == "not supported" and abs(v.values["angle_ratio"] - 2 / 3) < 1e-12, v
    rotating = {**update, "angle_u_mean_deg": np.full((M, 2), 6.0), "energy_rotation": np.full((M, 2), 0.09)}
    assert verdicts(svd_study(rotating, own, other))["rotation"].verdict == "supported"
    moving = {**rotating, "sdrift_mean_abs_rel_all": np.full((M, 2), 0.012)}
    assert verdicts(svd_study(moving, own, other))["rotation"].verdict == "not supported"


def test_a_wide_recovery_interval_is_inconclusive_for_both_questions():
    """[−0.1, 0.9] says neither that editing recovers nothing nor that it recovers most; the
    old rule said "not supported"."""
    v = verdicts(edit_study(np.array([-0.1, -0.1]), np.array([0.9, 0.9])))
    got = {k: x.verdict for k, x in v.items() if k.startswith("edit")}
    assert got == {"edit_some": "inconclusive", "edit_most": "inconclusive"}
    v = verdicts(edit_study(np.array([0.1, 0.2]), np.array([0.45, 0.4])))
    assert (v["edit_some"].verdict, v["edit_most"].verdict) == ("supported", "not supported")  # some, but not most
    v = verdicts(edit_study(np.array([0.6, 0.55]), np.array([0.95, 0.9])))
    assert (v["edit_some"].verdict, v["edit_most"].verdict) == ("supported", "supported")
    v = verdicts(edit_study(np.array([0.6, np.nan]), np.array([0.95, np.nan]), rho=np.array([0.8, 0.3])))
    assert v["edit_most"].verdict == "inconclusive" and "gap is not significant" in v["edit_most"].evidence


def test_loss_that_shows_the_peak():
    """The CE minimum at B's step (within one checkpoint spacing) shows the peak; at the end of
    SFT it does not. No significant peak: nothing to show (inconclusive)."""
    steps = np.array([10, 20, 30, 40, 50, 60])
    ood = np.zeros((6, HANDS))
    for i, a in enumerate([0.10, 0.20, 0.12, 0.08, 0.05, 0.04]):
        ood[i, : int(a * HANDS)] = 1
    idd = np.tile((np.arange(HANDS) < 300).astype(float), (6, 1))
    idd[-1, 300:340] = 1
    ce_steps = np.arange(2, 61, 2)
    at_peak = 1 + np.abs(ce_steps - 20) / 100
    falling = 1 - ce_steps / 100
    assert verdicts(sft_study(ood, idd, steps, at_peak, ce_steps))["loss"].verdict == "not supported"
    v = verdicts(sft_study(ood, idd, steps, falling, ce_steps))["loss"]
    assert v.verdict == "supported" and v.values["ce_ood_min_step"] == 60 and v.values["peak_window_hi_step"] == 30, v
    flat = np.tile((np.arange(HANDS) < 50).astype(float), (6, 1))
    assert verdicts(sft_study(flat, idd, steps, falling, ce_steps))["loss"].verdict == "inconclusive"


def test_docs_state_the_rules_as_implemented():
    text = DOCS.read_text()
    for key, rule in report.rules().items():
        assert f"- **{key}**: {rule}" in text, f"docs/verdicts.md: the {key} rule differs from tasks/report.py (regenerate with `python tests/test_verdicts.py`)"


# ---------------------------------------------------------------------------- review D1, D2, D5: cases that pin each clause


def window_case(gains: list[list[tuple[int, int, int]]], hands: int = HANDS) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic before / after outcomes (R, hands): per start a list of (first hand,
    count, change) blocks; change +1 solves hands the start did not, −1 loses hands it solved.
    Every start solves hands 0-49 before RL; a −1 block must lie there or on hands it solves."""
    R = len(gains)
    before = np.zeros((R, hands))
    before[:, :50] = 1
    after = before.copy()
    for i, blocks in enumerate(gains):
        for first, count, change in blocks:
            if change < 0:
                before[i, first : first + count] = 1
            after[i, first : first + count] = 1 if change > 0 else 0
    return before, after


def window_status(before, after) -> str:
    return report.WORDS[int(report.judge_window(before[None], after[None])["status"][0])]


def test_window_needs_a_significantly_lower_start_on_both_sides():
    """(M14) A healed inner start (+5 pp) with a flat start significantly below it on the left
    only: on the right two flat but noisy starts (50 hands gained, 50 lost) are not
    significantly below it at z = 2.64. A window needs both sides: inconclusive."""
    noisy = [(100, 50, +1), (0, 50, -1)]
    before, after = window_case([[], [(50, 25, +1)], noisy, noisy])
    s = report.judge_window(before[None], after[None])
    assert list(s["healed"][0]) == [False, True, False, False] and not s["edge_heals"][0].any()
    assert window_status(before, after) == "inconclusive"
    starts = np.array([40, 80, 160, 320])
    assert verdicts(rl_study(before, after, starts))["window"].verdict == "inconclusive"


def test_window_flanking_starts_must_not_heal():
    """(M2) The big heal (+8 pp at the third start) is significantly above the small heal
    (+3 pp) on its left, but that start heals too; the only non-healing start on the left is
    noisy (120 hands gained, 120 lost) and not significantly below. Recovery from the second
    start is no boundary of the window: inconclusive."""
    before, after = window_case([[(200, 120, +1), (300, 0, 0)], [(50, 15, +1)], [(50, 40, +1)], []])
    before[0, :] = 0
    before[0, 320:440] = 1
    after[0] = 0
    after[0, 200:320] = 1  # start 0: 120 hands gained, 120 lost, net 0
    s = report.judge_window(before[None], after[None])
    assert list(s["healed"][0]) == [False, True, True, False] and not s["edge_heals"][0].any()
    assert window_status(before, after) == "inconclusive"


def test_window_no_start_heals_is_inconclusive():
    """(D1, M15) RL heals from no start and hurts from one: lack of power (the window may lie
    between the tested starts), not evidence of no window. Inconclusive, with the evidence
    saying so; the old rule said "not supported"."""
    before, after = window_case([[], [(0, 30, -1)], [(50, 3, +1)], []])
    assert report.judge_window(before[None], after[None])["hurt"][0].any()
    assert window_status(before, after) == "inconclusive"
    v = verdicts(rl_study(before, after, np.array([40, 80, 160, 320])))["window"]
    assert v.verdict == "inconclusive" and "no start heals" in v.evidence, v


def test_an_edge_heal_is_judged_at_the_simultaneous_level():
    """(D2) The latest of 5 starts heals at the per-start 1.96 σ (t = 2.25) but not at the
    Bonferroni level over the starts (z = 2.58 for 5): no evidence of unbounded recovery, so
    the verdict is the window's (two healed starts flanked by a flat and a hurt one:
    supported), not "not supported". A clear edge heal still reads "not supported"."""
    base = [[], [(50, 60, +1)], [(50, 60, +1)], [(0, 30, -1)], []]
    weak = base[:4] + [[(100, 75, +1), (0, 50, -1)]]  # +5 pp, sd ≈ 0.50
    for gains, want in [(base, "supported"), (weak, "supported")]:
        before, after = window_case(gains)
        s = report.judge_window(before[None], after[None])
        assert window_status(before, after) == want, (gains, s["low"], s["edge_heals"])
    before, after = window_case(weak)
    s = report.judge_window(before[None], after[None])
    assert s["healed"][0, -1] and not s["edge_heals"][0, -1], (s["low"], s["gain"])
    strong = base[:4] + [[(100, 60, +1)]]
    assert window_status(*window_case(strong)) == "not supported"


def rl_study_from_base(before: np.ndarray, after: np.ndarray, starts: np.ndarray, base_after: np.ndarray, updates: int = 10) -> dict[str, pl.DataFrame]:
    """`rl_study` plus an RL run from the untuned base (step 0, all hands unsolved before)."""
    t = rl_study(before, after, starts, updates)
    att = pl.concat([t["eval_attempts"], attempts_rows("rl-0-10", "ood", base_after)])
    meta = {c: (st, int(sp)) for c, st, sp in zip(t["checkpoints"]["ckpt_id"], t["checkpoints"]["stage"], t["checkpoints"]["step"])} | {"rl-0-10": ("rl", updates)}
    row = pl.DataFrame({"ckpt_id": ["rl-0-10"], "stage": ["rl"], "step": [updates], "parent": ["base"], "rl_start_step": [0]}, schema_overrides={"step": pl.Int32, "rl_start_step": pl.Int32})
    return {"eval_attempts": att, "eval_summary": summary_rows(att, meta), "checkpoints": pl.concat([t["checkpoints"], row], how="vertical_relaxed")}


def test_window_leaves_out_rl_from_the_base():
    """(D2) RL from the base (step 0) heals a lot (it learns the answer format, §2.3), which
    as the earliest start would read "not supported"; the verdict leaves it out and judges
    the SFT starts, while the RL table keeps the base row."""
    before, after = window_case([[], [(50, 60, +1)], [(50, 60, +1)], [(0, 30, -1)]])
    base_after = (np.arange(HANDS) < 100).astype(float)
    t = rl_study_from_base(before, after, np.array([40, 80, 160, 320]), base_after)
    rec = report.rl_recovery(t, GP)
    assert rec["start_step"].to_list() == [0, 40, 80, 160, 320] and rec["status"][0] == "healed"
    v = report.verdict_window(rec, t["eval_attempts"], GP)
    assert v.verdict == "supported" and "from 0:" not in v.evidence, v
    assert report.verdict_window(rec.head(3), t["eval_attempts"], GP).verdict == "no data"  # base + 2 SFT starts


def test_rotation_needs_most_matrices_above_noise():
    """(M8) A large geometric mean carried by 3 of 14 matrices (ratio 100 there, 0.9 in the
    rest: geometric mean 2.5) is no consistent rotation: the sign test (3/14 above 1) makes it
    inconclusive, for the angles, for the rotation energy, and for both."""
    M = 14
    few = np.where(np.arange(M) < 3, 100.0, 0.9)
    broad = np.full(M, 2.0)
    drift = np.full((1, M), 0.003)
    for angle, energy in [(few, broad), (broad, few), (few, few)]:
        r = report.judge_rotation(drift, angle[None], energy[None])
        assert min(r["angle_ratio"][0], r["energy_ratio"][0]) >= report.ROTATION_MARGIN
        assert r["status"][0] == report.INCONCLUSIVE, (angle, energy, r)
    assert report.judge_rotation(drift, broad[None], broad[None])["status"][0] == report.SUPPORTED
    update = {"sdrift_mean_abs_rel_all": np.full((M, 2), 0.003), "angle_u_mean_deg": np.repeat(few[:, None], 2, 1), "energy_rotation": np.full((M, 2), 0.02), "energy_stretch": np.full((M, 2), 0.001)}
    noise = {**update, "angle_u_mean_deg": np.ones((M, 2)), "energy_rotation": np.full((M, 2), 0.01)}
    v = verdicts(svd_study(update, noise))["rotation"]
    assert v.verdict == "inconclusive" and "3/14 matrices above 1" in v.evidence, v


def test_loss_plausible_peak_steps_reach_bs_lower_bound():
    """(M16) Step 50's OOD accuracy (14.4 %, Wilson upper bound ≈ 17.7 %) is below B's point
    estimate (20 % at step 20) but reaches B's lower bound (≈ 16.7 %): a plausible peak step,
    so the window runs to step 60 and a CE minimum at step 50 shows the peak (not supported).
    Judged against B's point estimate the window would stop at step 30 ("supported")."""
    steps = np.array([10, 20, 30, 40, 50, 60])
    ood = np.zeros((6, HANDS))
    for i, a in enumerate([0.10, 0.20, 0.12, 0.08, 0.144, 0.04]):
        ood[i, : int(round(a * HANDS))] = 1
    lo_b, _ = report.wilson(np.array([100]), HANDS)
    _, hi_50 = report.wilson(np.array([72]), HANDS)
    assert lo_b[0] < hi_50[0] < 0.20
    idd = np.tile((np.arange(HANDS) < 300).astype(float), (6, 1))
    idd[-1, 300:340] = 1
    ce_steps = np.arange(2, 61, 2)
    ce = 1 + np.abs(ce_steps - 50) / 100  # lowest at step 50
    v = verdicts(sft_study(ood, idd, steps, ce, ce_steps))["loss"]
    assert v.values["ce_ood_min_step"] == 50 and v.values["peak_window_hi_step"] == 60 and v.verdict == "not supported", v


def most_power_by_hands(draws: int, hands=(500, 1000, 2000, 4000, 8000)) -> str:
    """How many hands per split "recovers most" needs at the paper's ρ = 0.75 (two variants)."""
    lines = ["| hands per split | supported, r = 0 | supported, r = 0.5 |", "|---|---|---|"]
    for h in hands:
        cells = []
        for r in (0.0, 0.5):
            lo, hi, _ = edit_draws(np.random.default_rng([h, int(10 * r)]), draws, 0.75, r=r, hands=h)
            cells.append(f"{100 * (report.judge_recovery(lo, hi)['most'] == report.SUPPORTED).mean():.1f} %")
        lines.append(f"| {h} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(report.rules_markdown())
    print(f"\nRates over {n} draws per scenario, {HANDS} hands per split:\n")
    print(rates_markdown(n))
    print(f"\nediting_most at ρ = 0.75 by the number of hands ({n // 4} draws each):\n")
    print(most_power_by_hands(n // 4))
