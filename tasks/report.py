"""Stage `report`: figures and verdicts from the study's Parquet tables alone.

`build(tables_dir, out_dir)` writes PNG figures, `report.md` and a self-contained
`report.html` (figures inlined). Every section appears when its table exists and
says so when it does not. The paper's numbers (paper_reference.csv, through the task's
`Benchmark.paper_reference`) are always labelled as the paper's, never mixed with the study's.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from scipy import stats  # noqa: E402

from rlheal.caching import Stage  # noqa: E402
from rlheal.store import sha256_file  # noqa: E402
from tasks import benchmark  # noqa: E402
from tasks.benchmark import Benchmark, solved  # noqa: E402

log = logging.getLogger("rlheal.report")
# Redrawn whenever its inputs change (`inputs`); 2: verdict rules of docs/verdicts.md (issue 14 §6).
STAGE = Stage("report", version="2")


def read_tables(tables_dir: Path) -> dict[str, pl.DataFrame]:
    return {p.stem: pl.read_parquet(p) for p in sorted(Path(tables_dir).glob("*.parquet"))}


# ---------------------------------------------------------------------------- views


def sft_accuracy(t: dict[str, pl.DataFrame], bench: Benchmark) -> pl.DataFrame | None:
    """Accuracy per SFT step and split (base = step 0), from eval_summary, with the task's
    own metrics (`Benchmark.report_columns`)."""
    if "eval_summary" not in t:
        return None
    s = t["eval_summary"].filter(pl.col("stage").is_in(["base", "sft"]))
    if (extra := bench.report_columns(t)) is not None:
        s = s.join(extra, on=["ckpt_id", "split"], how="left")
    return s.sort("split", "step") if s.height else None


def rl_recovery(t: dict[str, pl.DataFrame], bench: Benchmark) -> pl.DataFrame | None:
    """OOD accuracy before RL (the starting SFT checkpoint) and after (the run's last update),
    and the gain with its paired interval over the same OOD hands (`start_gains`) where the
    per-hand outcomes (eval_attempts) are there: status healed / hurt / flat."""
    if "eval_summary" not in t or "checkpoints" not in t:
        return None
    ck = t["checkpoints"]
    if "rl_start_step" not in ck.columns or ck.filter(pl.col("stage") == "rl").is_empty():
        return None
    ev = t["eval_summary"].filter(pl.col("split") == "ood")
    final = ck.filter(pl.col("stage") == "rl").sort("step").group_by("rl_start_step").last()
    after = final.join(ev, on="ckpt_id").select(pl.col("rl_start_step").alias("start_step"), pl.col("ckpt_id").alias("after_id"), pl.col("step").alias("updates"), pl.col("accuracy").alias("ood_after"), pl.col("accuracy_ci_low").alias("after_low"), pl.col("accuracy_ci_high").alias("after_high"), pl.col("k").alias("k_after"))
    before = ev.filter(pl.col("stage").is_in(["base", "sft"])).select(pl.col("step").alias("start_step"), pl.col("ckpt_id").alias("before_id"), pl.col("accuracy").alias("ood_before"), pl.col("accuracy_ci_low").alias("before_low"), pl.col("accuracy_ci_high").alias("before_high"), pl.col("k").alias("k_before"), "n")
    out = after.join(before, on="start_step").sort("start_step").with_columns(gain=pl.col("ood_after") - pl.col("ood_before"))
    paired = rl_outcomes(t.get("eval_attempts"), out, bench)
    if paired is None:
        return out.with_columns(gain_low=pl.lit(None, pl.Float64), gain_high=pl.lit(None, pl.Float64), status=pl.lit(None, pl.String), healed=pl.lit(False))
    g = start_gains(*(x[None] for x in paired))
    status = np.where(g["healed"][0], "healed", np.where(g["hurt"][0], "hurt", "flat"))
    return out.with_columns(gain_low=pl.Series(g["low"][0]), gain_high=pl.Series(g["high"][0]), status=pl.Series(status), healed=pl.Series(g["healed"][0]))


def rl_starts(t: dict[str, pl.DataFrame], rec: pl.DataFrame | None) -> pl.DataFrame | None:
    """One row per RL start (issue 15 §5): ID accuracy before and after RL (Wilson 95 %),
    the mean rollout reward of the first and last fifth of the updates (ID hands, at the
    rollout temperature), and the raw advantage distribution: mean interquartile and
    5-95 % spread over updates, and the normalised entropy of the run's summed histogram
    (1 = spread evenly over the bins, 0 = one bin): the paper's "flat" distribution."""
    if rec is None or "rl_log" not in t:
        return None
    from tasks.rl.common import reward_fifths  # the stability test's own fifths (docs/toy-rl.md)

    ev = t["eval_summary"].filter(pl.col("split") == "id").select("ckpt_id", "accuracy", "accuracy_ci_low", "accuracy_ci_high")
    ids = rec.select("start_step", "before_id", "after_id")
    before = ids.join(ev.rename({c: f"id_before{c[8:]}" for c in ev.columns if c != "ckpt_id"}), left_on="before_id", right_on="ckpt_id")
    both = before.join(ev.rename({c: f"id_after{c[8:]}" for c in ev.columns if c != "ckpt_id"}), left_on="after_id", right_on="ckpt_id")
    rows = []
    for (step,), g in t["rl_log"].sort("update").group_by("rl_start_step", maintain_order=True):
        hists = g["adv_hist"].drop_nulls().to_list() if "adv_hist" in g.columns else []  # GRPO reusing a generation logs none
        hist = np.sum(np.stack(hists), axis=0) if hists else None
        p = hist / hist.sum() if hist is not None and hist.sum() else None
        entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum() / np.log(len(p))) if p is not None else None
        rows.append({
            "start_step": step,
            **dict(zip(("reward_first_fifth", "reward_last_fifth"), reward_fifths(g))),
            "adv_iqr": (g["adv_q75"] - g["adv_q25"]).mean(),
            "adv_q05_q95": (g["adv_q95"] - g["adv_q05"]).mean(),
            "adv_entropy": entropy,
        })  # fmt: skip
    logs = pl.DataFrame(rows, schema_overrides={"start_step": both.schema["start_step"]})
    return both.join(logs, on="start_step", how="left").drop("before_id", "after_id").sort("start_step")


def rl_outcomes(attempts: pl.DataFrame | None, rec: pl.DataFrame, bench: Benchmark) -> tuple[np.ndarray, np.ndarray] | None:
    """(before, after): OOD outcomes (R starts x H hands) of each RL run's starting checkpoint
    and of its last update, on the same hands; None without complete per-hand outcomes."""
    if attempts is None:
        return None
    got = solved_matrix(attempts, "ood", list(dict.fromkeys(rec["before_id"].to_list() + rec["after_id"].to_list())), bench)
    if got is None:
        return None
    _, ids, y = got
    row = {c: i for i, c in enumerate(ids)}
    return y[[row[c] for c in rec["before_id"]]], y[[row[c] for c in rec["after_id"]]]


def solved_matrix(attempts: pl.DataFrame, split: str, ckpt_ids: list[str], bench: Benchmark) -> tuple[np.ndarray, list[str], np.ndarray] | None:
    """Per-hand outcomes of `ckpt_ids` on one split: (hand_index (H,), ckpt_ids, outcomes (C, H)),
    1.0 where some attempt of the episode solved it (`Benchmark.solved_rows`, the `k` of eval_summary).
    None if a checkpoint has no outcomes or the checkpoints were not played on the same hands."""
    a = attempts.filter((pl.col("split") == split) & pl.col("ckpt_id").is_in(ckpt_ids))
    per = a.group_by("ckpt_id", "hand_index").agg(solved=solved(bench).any().cast(pl.Float64))
    if per.is_empty() or set(per["ckpt_id"]) != set(ckpt_ids):
        return None
    wide = per.pivot(on="ckpt_id", index="hand_index", values="solved").sort("hand_index")
    if wide.null_count().sum_horizontal().item():
        return None
    return wide["hand_index"].to_numpy(), list(ckpt_ids), wide.select(ckpt_ids).to_numpy().T


# ---------------------------------------------------------------------------- figures


def _save(fig, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_accuracy(acc: pl.DataFrame, rec: pl.DataFrame | None, out: Path, bench: Benchmark) -> Path:
    fig, (ax, axp) = plt.subplots(1, 2, figsize=(12, 4.2))
    for split, color in (("id", "tab:blue"), ("ood", "tab:red")):
        d = acc.filter(pl.col("split") == split)
        ax.plot(d["step"], 100 * d["accuracy"], "o-", color=color, label=f"{split.upper()} after SFT")
        ax.fill_between(d["step"].to_list(), (100 * d["accuracy_ci_low"]).to_list(), (100 * d["accuracy_ci_high"]).to_list(), color=color, alpha=0.15)
    if rec is not None:
        ax.errorbar(rec["start_step"], 100 * rec["ood_after"], yerr=[100 * (rec["ood_after"] - rec["after_low"]), 100 * (rec["after_high"] - rec["ood_after"])], fmt="s--", color="tab:green", label="OOD after RL from step")
        healed = rec.filter(pl.col("healed"))
        if healed.height:
            ax.axvspan(healed["start_step"].min(), healed["start_step"].max(), color="tab:green", alpha=0.08, label="recovery window")
    ax.set(xlabel="SFT step", ylabel="accuracy (%)", title="This study (Wilson 95 % bands)")
    ax.legend(fontsize=8)
    if (ref := bench.paper_reference()) is not None:
        for stage, style in (("sft", "o-"), ("rl", "s--")):
            d = ref.curve.filter(pl.col("stage").is_in([stage, "base"] if stage == "sft" else [stage])).sort("sft_step")
            axp.errorbar(d["sft_step"], d["accuracy_pct"], yerr=ref.se_pp, fmt=style, capsize=2, label="paper: OOD after SFT" if stage == "sft" else "paper: OOD after RL from step")
        axp.axvspan(*ref.window, color="tab:green", alpha=0.08, label="paper: recovery window")
        axp.set(xlabel="SFT step", ylabel="OOD accuracy (%)", title=f"PAPER ({ref.label}, ±{ref.se_pp:g} pp SE)")
        axp.legend(fontsize=8)
    else:
        axp.set_axis_off()
    return _save(fig, out, "fig1_accuracy_vs_sft_step")


def fig_format_errors(acc: pl.DataFrame, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for split, color in (("id", "tab:blue"), ("ood", "tab:red")):
        d = acc.filter(pl.col("split") == split)
        ax.plot(d["step"], 100 * d["format_error_rate"], "o-", color=color, label=split.upper())
    ax.set(xlabel="SFT step", ylabel="format error rate (% of attempts)", title="Format errors during SFT")
    ax.legend()
    return _save(fig, out, "fig2_format_errors")


def ce_target(sft_log: pl.DataFrame) -> str:
    """Which answer the logged CE scores: the one SFT trains on (`data.answer`), named so a
    reader never mistakes the dealt reference for the trained target (training.md §7.3)."""
    if "ce_target" in sft_log.columns and sft_log.drop_nulls("ce_target").height:
        return str(sft_log.drop_nulls("ce_target")["ce_target"][0])
    return "reference"


def fig_losses(sft_log: pl.DataFrame, acc: pl.DataFrame | None, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = sft_log.drop_nulls("train_loss")
    ax.plot(tr["step"], tr["train_loss"], color="gray", label="train loss")
    ce = sft_log.drop_nulls("ce_ood")
    if ce.height:
        target = ce_target(sft_log)
        ax.plot(ce["step"], ce["ce_ood"], "o-", color="tab:red", label=f"OOD CE of the {target} answer")
        ax.plot(ce["step"], ce["ce_id"], "o-", color="tab:blue", label=f"ID CE of the {target} answer")
        best = ce.sort("ce_ood").row(0, named=True)
        ax.axvline(best["step"], color="tab:red", ls=":", label=f"OOD CE minimum (step {best['step']})")
    if acc is not None and acc.filter(pl.col("split") == "ood").height:
        peak = acc.filter((pl.col("split") == "ood") & (pl.col("step") > 0)).sort(["accuracy", "step"], descending=[True, False])
        if peak.height:
            ax.axvline(peak["step"][0], color="tab:green", ls="--", label=f"OOD accuracy peak (step {peak['step'][0]})")
    ax.set(xlabel="SFT step", ylabel="nats / token", title="Loss does not necessarily show the OOD peak")
    ax.legend(fontsize=8)
    return _save(fig, out, "fig3_losses")


def fig_svd(pairs: pl.DataFrame, checkpoints: pl.DataFrame, angles_col: str, out: Path) -> Path | None:
    steps = checkpoints.filter(pl.col("stage").is_in(["base", "sft"])).select(pl.col("ckpt_id").alias("tgt_id"), pl.col("step").alias("tgt_step"))
    traj = pairs.filter((pl.col("comparison") == "weights") & pl.col("skip_reason").is_null()).join(steps, on="tgt_id")
    if traj.is_empty():
        return None
    k0 = traj["k"].min()
    traj = traj.filter(pl.col("k") == k0)
    fig, (ax, axh) = plt.subplots(1, 2, figsize=(12, 4))
    for ref, d in traj.group_by("ref_id", maintain_order=True):
        m = d.group_by("tgt_step").agg(pl.col("sdrift_mean_abs_rel_all").mean()).sort("tgt_step")
        ax.plot(m["tgt_step"], m["sdrift_mean_abs_rel_all"], "o-", label=f"from {ref[0]}")
    ax.set(xlabel="SFT step", ylabel="mean |Δσ|/σ", title="Singular-value drift")
    ax.legend(fontsize=8)
    base = traj.filter(pl.col("ref_id") == traj["ref_id"][0])
    grid = base.with_columns(row=pl.format("L{} {}", pl.col("layer"), pl.col("module"))).pivot(on="tgt_step", index="row", values=angles_col, aggregate_function="mean").sort("row")
    cols = sorted((c for c in grid.columns if c != "row"), key=int)
    im = axh.imshow(grid.select(cols).to_numpy(), aspect="auto", cmap="viridis")
    axh.set_xticks(range(len(cols)), cols)
    axh.set_yticks(range(grid.height), grid["row"].to_list(), fontsize=6)
    axh.set(xlabel="SFT step", title=f"mean principal angle (deg), top-{k0} left subspaces, from {base['ref_id'][0]}")
    fig.colorbar(im, ax=axh)
    return _save(fig, out, "fig4_svd")


def fig_advantages(rl_log: pl.DataFrame, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    q = ["adv_q05", "adv_q25", "adv_q50", "adv_q75", "adv_q95"]
    d = rl_log.group_by("rl_start_step").agg(*[pl.col(c).mean() for c in q]).sort("rl_start_step")
    x = list(range(d.height))
    ax.bxp([{"whislo": r["adv_q05"], "q1": r["adv_q25"], "med": r["adv_q50"], "q3": r["adv_q75"], "whishi": r["adv_q95"], "label": str(r["rl_start_step"])} for r in d.iter_rows(named=True)], positions=x, showfliers=False)
    ax.set(xlabel="RL started from SFT step", ylabel="raw advantage (5-25-50-75-95 %)", title="PPO advantage distribution per starting checkpoint")
    return _save(fig, out, "fig5_advantages")


def edit_lines(res: pl.DataFrame, variants: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The k_top sweeps to plot, one line per experiment and k_tail (E2 and E5 both use
    swap_directions but are different experiments: B→S and S→R), k_top as a number in
    increasing order; layer-range variants are not on a k axis and are left out."""
    d = res.join(variants, on="variant_id").filter((pl.col("method") != "none") & pl.col("layers_spec").is_null())
    d = d.with_columns(k_top=pl.col("k_top_spec").cast(pl.Float64, strict=False)).drop_nulls("k_top")
    lines = {}
    for (experiment, method, tail), g in d.group_by("experiment", "method", "k_tail_spec", maintain_order=True):
        label = f"{experiment} {method}" + ("" if tail in ("0", "0.0") else f", k_tail {tail}")
        lines[label] = g.sort("k_top")
    return dict(sorted(lines.items()))


def fig_edit(res: pl.DataFrame, variants: pl.DataFrame, out: Path) -> Path | None:
    lines = edit_lines(res, variants)
    if not lines:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label, g in lines.items():
        for split, ax in (("OOD", axes[0]), ("ID", axes[1])):
            s = g.filter(pl.col("split") == split)
            ax.plot(s["k_top"], 100 * s["accuracy"], "o-", label=label)
        r = g.filter(pl.col("split") == "OOD")
        axes[2].plot(r["k_top"], r["recovery_fraction"], "o-", label=label)
    axes[2].axhspan(0.7, 0.8, color="tab:green", alpha=0.1, label="claim: 70-80 %")
    for ax, title in zip(axes, ("OOD accuracy (%)", "ID accuracy (%)", "recovery fraction")):
        ax.set(xlabel="k_top (fraction of r, or absolute)", title=title)
        ax.legend(fontsize=7)
    return _save(fig, out, "fig6_edit")


# ---------------------------------------------------------------------------- verdict rules
#
# Each rule is a numpy function over a leading axis of draws: a study is one draw, and
# tests/test_verdicts.py runs the same functions on hundreds of synthetic studies to measure
# every rule's false-positive rate and power (docs/verdicts.md). Outcomes are per hand (1 =
# solved within the episode, the `k` of eval_summary), so two checkpoints are compared on the
# same hands, paired.

LEVEL = 0.95  # every interval is two-sided at this level: a one-sided claim errs at most 2.5 %
Z = float(stats.norm.ppf(0.5 + LEVEL / 2))
SUPPORTED, INCONCLUSIVE, NOT_SUPPORTED = 1, 0, -1
WORDS = {SUPPORTED: "supported", INCONCLUSIVE: "inconclusive", NOT_SUPPORTED: "not supported"}
# Rotation. The paper's Σ drift is 0.28-0.73 % (F7, every step): 1 % keeps all of it and calls
# "moving" any drift above the paper's largest spike, so a replication of the paper passes.
SIGMA_DRIFT_MAX = 0.01
ROTATION_MARGIN = 1.25  # update / noise-control ratio needed, geometric mean over matrices
SIGN_TEST_ALPHA = 0.025  # one-sided sign test over matrices: more of them above noise than chance
# Editing: the two questions about the recovery fraction ρ (analysis.md §4.4).
RECOVERS_SOME = 0.0  # ρ > 0
RECOVERS_MOST = 0.5  # ρ ≥ 0.5; the paper claims 0.7-0.8


def rules() -> dict[str, str]:
    """The rules exactly as the functions below implement them, one sentence block per
    finding; the report's header and docs/verdicts.md print this text."""
    from tasks.edit.grid import CLAIM_LAYERS, CLAIM_TOP

    ci = f"{100 * LEVEL:.0f} %"
    z = f"{Z:.3f}"
    return {
        "forgetting": (
            f"OOD hands are split by the parity of their index. On each half, B is the SFT checkpoint (step > 0) with the most solved hands "
            f"(ties: the earlier step); each hand is then scored by the B chosen on the *other* half (cross-fit: B's accuracy without its selection bias). "
            f"Drop = held-out B minus S (the last checkpoint), per hand; ID rise = ID at S minus ID at B (B chosen on all OOD hands), per hand; "
            f"each with the normal {ci} interval of a mean of paired differences (± {z}·sd/√n). "
            f"**Supported**: both lower ends > 0. **Not supported**: the drop's upper end ≤ 0 (no peak above the end) or the rise's upper end < 0 (ID falls too). Otherwise inconclusive."
        ),
        "loss": (
            f"Needs a peak (the forgetting drop's lower end > 0), else inconclusive. Plausible peak steps: SFT checkpoints whose Wilson {ci} upper bound on OOD accuracy "
            f"reaches B's lower bound; the peak window runs from the saved checkpoint before the first plausible step to the one after the last (one checkpoint spacing either side). "
            f"m = the logged step with the lowest OOD reference-answer CE (ties: the earlier). **Supported** (loss does not show the peak): m outside the window. **Not supported**: m inside it."
        ),
        "window": (
            f"Per start: gain = OOD after RL minus before, per hand, {ci} interval: healed (lower end > 0), hurt (upper end < 0), flat otherwise. "
            f"Between starts: differences of gains, paired per hand, with Bonferroni-simultaneous intervals over all R(R−1)/2 pairs (one-sided 2.5 %). "
            f"Starts are the SFT checkpoints (step > 0): RL from the untuned base (step 0) measures learning the answer format, not recovering OOD ability, so it is left out of this verdict (the RL table still lists it). "
            f"**Not supported** (no window): the earliest or the latest start heals at the Bonferroni level over the R starts (gain − z·se > 0 with z for one-sided 2.5 %/R: recovery is not bounded on that side). "
            f"**Supported**: otherwise, if a healed start has an earlier and a later start that do not heal and whose gains are both significantly below its own. "
            f"Otherwise inconclusive, including when no start heals (that is lack of power: the window may lie between the tested starts); fewer than 3 starts: no data."
        ),
        "rotation": (
            f"Rows B→S of svd_pair_metrics and the noise control of the same pair (tgt_id noise:B..S: B plus iid noise of the same ‖ΔW‖_F), matched on matrix and k. "
            f"σ drift: mean over matrices of sdrift_mean_abs_rel_all. Per matrix: the geometric mean over k of angle_u_mean_deg(B→S)/angle_u_mean_deg(noise) and of energy_rotation(B→S)/energy_rotation(noise). "
            f"**Supported**: drift < {100 * SIGMA_DRIFT_MAX:g} %, both geometric means over matrices ≥ {ROTATION_MARGIN:g}, and for both more matrices above 1 than chance allows "
            f"(one-sided sign test, p ≤ {SIGN_TEST_ALPHA:g}; needs ≥ {math.ceil(-math.log2(SIGN_TEST_ALPHA))} matrices). **Not supported**: drift ≥ {100 * SIGMA_DRIFT_MAX:g} % or either geometric mean ≤ 1. Otherwise inconclusive."
        ),
        "edit_some": (
            f"The claimed variants (E2 with k_top {CLAIM_TOP:g} on every layer, E3 on layers {CLAIM_LAYERS} with k_top 1.0; those that edit no matrix are skipped), OOD recovery fraction ρ with its paired-bootstrap {ci} interval (analysis.md §4.4; "
            f"no interval when the donor-target gap is not significant). Per variant: supported if the interval lies above {RECOVERS_SOME:g}, not supported if it lies at or below {RECOVERS_SOME:g}, inconclusive otherwise. "
            f"**Supported**: every variant supported; **not supported**: any variant not supported; otherwise inconclusive."
        ),
        "edit_most": (
            f"As above with the question ρ ≥ {RECOVERS_MOST:g}: a variant is supported if its interval's lower end is ≥ {RECOVERS_MOST:g}, not supported if its upper end is < {RECOVERS_MOST:g}. "
            f"A wide interval such as [−0.1, 0.9] is inconclusive for both questions."
        ),
        "monitor": (
            f"drift_selection's picks among the SFT checkpoints (base included): the monitor's (docs/monitor.md: ID accuracy and drift on the OOD prompts, no OOD answer), "
            f"the lowest ID reference CE's and the lowest training loss's. Per loss rule: the OOD accuracy of the monitor's pick minus that rule's pick, per hand, "
            f"with the normal {ci} interval of the mean of paired differences. **Supported**: both lower ends > 0. "
            f"**Not supported**: either upper end ≤ 0 (picking a loss rule's checkpoint is a difference of 0). Otherwise inconclusive. "
            f"No data: no drift stage, or a rule other than the one fixed before any result (drift.signal js, rho 0.5)."
        ),
    }


def mean_interval(x: np.ndarray, z: float = Z) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over the last axis (hands) and its normal interval mean ± z·sd/√n."""
    n = x.shape[-1]
    m = x.mean(-1)
    h = z * x.std(-1, ddof=1) / math.sqrt(n) if n > 1 else np.full_like(m, np.inf)
    return m, m - h, m + h


def wilson(k: np.ndarray, n: int | np.ndarray, z: float = Z) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (the eval stage's, GP §9), vectorised."""
    p = np.asarray(k, dtype=np.float64) / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return np.clip(c - h, 0, 1), np.clip(c + h, 0, 1)


def _status(supported: np.ndarray, refuted: np.ndarray) -> np.ndarray:
    return np.where(supported, SUPPORTED, np.where(refuted, NOT_SUPPORTED, INCONCLUSIVE))


def judge_forgetting(ood: np.ndarray, idd: np.ndarray, half: np.ndarray) -> dict[str, np.ndarray]:
    """ood (D, C, H) and idd (D, C, H') outcomes of the SFT checkpoints with step > 0 in step
    order (the last is S); half (H,) 0/1 of each OOD hand."""
    rows = np.arange(ood.shape[0])
    b = ood.mean(-1).argmax(1)  # the first maximum: ties go to the earlier step
    on_half = np.stack([ood[..., half == h].mean(-1) for h in (0, 1)], axis=-1)  # (D, C, 2)
    pick = on_half.argmax(1)  # (D, 2): B chosen on half 0 and on half 1
    scored_by = pick[:, 1 - half]  # (D, H): each hand scored by the other half's B
    held_out = np.take_along_axis(ood, scored_by[:, None, :], axis=1)[:, 0]
    drop, drop_lo, drop_hi = mean_interval(held_out - ood[:, -1])
    rise, rise_lo, rise_hi = mean_interval(idd[:, -1] - idd[rows, b])
    status = _status((drop_lo > 0) & (rise_lo > 0), (drop_hi <= 0) | (rise_hi < 0))
    return {"status": status, "b": b, "pick": pick, "held_out": held_out.mean(-1), "drop": drop, "drop_lo": drop_lo, "drop_hi": drop_hi, "rise": rise, "rise_lo": rise_lo, "rise_hi": rise_hi}


def judge_loss(k: np.ndarray, n: int, steps: np.ndarray, saved: np.ndarray, b: np.ndarray, peak: np.ndarray, ce_steps: np.ndarray, ce: np.ndarray) -> dict[str, np.ndarray]:
    """k (D, C): OOD hands solved (of n) by the SFT checkpoints at `steps` (step > 0, sorted);
    saved: every evaluated step, base included, sorted; b (D,): index of B; peak (D,): the
    forgetting drop is significant; ce (D, L): OOD reference CE at the logged `ce_steps`."""
    lo, hi = wilson(k, n)
    plausible = hi >= lo[np.arange(k.shape[0]), b][:, None]
    first = np.where(plausible, steps, np.inf).min(1)
    last = np.where(plausible, steps, -np.inf).max(1)
    w_lo = saved[np.clip(np.searchsorted(saved, first, "left") - 1, 0, len(saved) - 1)]
    w_hi = saved[np.clip(np.searchsorted(saved, last, "right"), 0, len(saved) - 1)]
    m = ce_steps[np.argmin(ce, axis=1)]
    inside = (m >= w_lo) & (m <= w_hi)
    status = np.where(~peak, INCONCLUSIVE, np.where(inside, NOT_SUPPORTED, SUPPORTED))
    return {"status": status, "min_step": m, "window_lo": w_lo, "window_hi": w_hi, "first": first, "last": last}


def start_gains(before: np.ndarray, after: np.ndarray) -> dict[str, np.ndarray]:
    """Per RL start: gain (after − before, paired per hand) and its interval; (D, R, H) in."""
    gain, lo, hi = mean_interval(after - before)
    return {"gain": gain, "low": lo, "high": hi, "healed": lo > 0, "hurt": hi < 0}


def judge_window(before: np.ndarray, after: np.ndarray) -> dict[str, np.ndarray]:
    """before / after (D, R, H): OOD outcomes at each start (R >= 2, in step order) and after RL."""
    D, R, H = before.shape
    g = after - before
    s = start_gains(before, after)
    healed = s["healed"]
    z = float(stats.norm.ppf(1 - (1 - LEVEL) / 2 / (R * (R - 1) // 2)))
    c = g - g.mean(-1, keepdims=True)
    cov = np.einsum("drh,dsh->drs", c, c) / (H - 1)
    var = np.diagonal(cov, axis1=1, axis2=2)
    se = np.sqrt(np.maximum(var[:, :, None] + var[:, None, :] - 2 * cov, 0) / H)
    above = s["gain"][:, :, None] - s["gain"][:, None, :] - z * se > 0  # [d, j, i]: start j significantly above start i
    order = np.arange(R)
    fails = above & ~healed[:, None, :]  # ... and start i does not heal
    left = (fails & (order[None, :] < order[:, None])).any(2)
    right = (fails & (order[None, :] > order[:, None])).any(2)
    window = (healed & left & right).any(1)
    # An edge start that heals means recovery is not bounded on that side: judged at the
    # Bonferroni level over the R starts (one-sided 2.5 % in all), as strict as the contrasts
    # that "supported" needs. No start healing is a lack of power (the window may lie between
    # the tested starts), not evidence of no window: inconclusive.
    z_starts = float(stats.norm.ppf(1 - (1 - LEVEL) / 2 / R))
    sd = np.sqrt(var / H)
    edge_heals = s["gain"][:, [0, -1]] - z_starts * sd[:, [0, -1]] > 0  # (D, 2): earliest, latest
    no_window = edge_heals.any(1)
    status = np.where(no_window, NOT_SUPPORTED, np.where(window, SUPPORTED, INCONCLUSIVE))
    return s | {"status": status, "z_pairs": np.full(D, z), "z_starts": np.full(D, z_starts), "edge_heals": edge_heals}


def judge_rotation(drift: np.ndarray, angle_ratio: np.ndarray, energy_ratio: np.ndarray) -> dict[str, np.ndarray]:
    """Per draw and matrix (D, M): σ drift of B→S, and the update / noise-control ratios of the
    mean top-k angle and of the rotation energy (geometric means over k)."""
    M = drift.shape[1]
    d = drift.mean(1)
    la, le = np.log(angle_ratio), np.log(energy_ratio)
    A, E = np.exp(la.mean(1)), np.exp(le.mean(1))
    pa, pe = (stats.binom.sf((x > 0).sum(1) - 1, M, 0.5) for x in (la, le))
    supported = (d < SIGMA_DRIFT_MAX) & (A >= ROTATION_MARGIN) & (E >= ROTATION_MARGIN) & (pa <= SIGN_TEST_ALPHA) & (pe <= SIGN_TEST_ALPHA)
    return {"status": _status(supported, (d >= SIGMA_DRIFT_MAX) | (A <= 1) | (E <= 1)), "drift": d, "angle_ratio": A, "energy_ratio": E, "p_angle": pa, "p_energy": pe}


def judge_monitor(pick: np.ndarray, loss: np.ndarray) -> dict[str, np.ndarray]:
    """pick (D, H): OOD outcomes of the monitor's checkpoint; loss (D, L, H): of each loss
    rule's (the same checkpoint gives the same outcomes: a difference of 0)."""
    diff, lo, hi = mean_interval(pick[:, None, :] - loss)
    return {"status": _status((lo > 0).all(1), (hi <= 0).any(1)), "diff": diff, "low": lo, "high": hi}


def claim_status(lo: np.ndarray, hi: np.ndarray, threshold: float, inclusive: bool) -> np.ndarray:
    """Supported when the interval lies inside the claim's region (ρ > t, or ρ ≥ t when
    `inclusive`), not supported when it lies outside; NaN bounds (no interval) are inconclusive."""
    with np.errstate(invalid="ignore"):
        inside = lo >= threshold if inclusive else lo > threshold
        outside = hi < threshold if inclusive else hi <= threshold
    return _status(inside, outside)


def judge_recovery(lo: np.ndarray, hi: np.ndarray) -> dict[str, np.ndarray]:
    """lo / hi (D, V): the recovery intervals of the claimed variants (NaN where null)."""
    out = {}
    for key, (t, inclusive) in {"some": (RECOVERS_SOME, False), "most": (RECOVERS_MOST, True)}.items():
        per = claim_status(lo, hi, t, inclusive)
        out[key] = _status((per == SUPPORTED).all(1), (per == NOT_SUPPORTED).any(1))
        out[f"{key}_per_variant"] = per
    return out


# ---------------------------------------------------------------------------- verdicts


# The paper's findings as this study judges them, in report order; the keys name them in
# tables (replicates). The paper's claim 1 is two questions here (forgetting, loss), its
# claim 5 two more (edit_some, edit_most).
FINDINGS = {
    "forgetting": "OOD accuracy peaks early in SFT, then falls while ID keeps rising",
    "loss": "The reference-answer loss does not show the OOD peak",
    "window": "RL restores OOD ability only from checkpoints inside a window (not too early, not too late)",
    "rotation": "Singular values barely move while singular vectors rotate",
    "edit_some": "Restoring singular directions (top 20 %, or the first 25 % of layers) recovers some of the lost OOD ability (ρ > 0)",
    "edit_most": "... and recovers most of it (ρ ≥ 0.5; the paper: 70-80 %)",
    "monitor": "A label-free signal locates the OOD peak better than loss (beyond the paper: docs/monitor.md)",
}
LOSS_RULES = {"lowest_id_ce": "the lowest ID reference CE", "lowest_train_loss": "the lowest training loss"}


@dataclass
class Verdict:
    finding: str
    evidence: str
    verdict: str  # supported | not supported | inconclusive | no data
    values: dict[str, float] = field(default_factory=dict)  # the evidence's numbers, for comparing replicates


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


def _iv(m: float, lo: float, hi: float) -> str:
    return f"{_pp(m)} [{_pp(lo)}, {_pp(hi)}]"


def _ci(row: dict, prefix: str = "accuracy") -> str:
    return f"{_pct(row[prefix])} [{_pct(row[prefix + '_ci_low'])}, {_pct(row[prefix + '_ci_high'])}] ({row['k']}/{row['n']})"


@dataclass
class _SftOutcomes:
    """Per-hand outcomes of the SFT checkpoints (step > 0) behind the forgetting and loss rules."""

    steps: np.ndarray
    ids: list[str]
    ood_hands: np.ndarray
    ood: np.ndarray
    idd: np.ndarray


def _sft_outcomes(acc: pl.DataFrame | None, attempts: pl.DataFrame | None, bench: Benchmark) -> _SftOutcomes | str:
    if acc is None:
        return "no evaluation results"
    if attempts is None:
        return "no per-hand outcomes (eval_attempts)"
    sft = acc.filter(pl.col("step") > 0)
    both = sft.group_by("ckpt_id", "step").agg(pl.col("split").n_unique().alias("splits")).filter(pl.col("splits") == 2).sort("step")
    if both.height < 2:
        return "fewer than two SFT checkpoints evaluated on both splits"
    ids = both["ckpt_id"].to_list()
    ood, idd = solved_matrix(attempts, "ood", ids, bench), solved_matrix(attempts, "id", ids, bench)
    if ood is None or idd is None or len(ood[0]) < 4:
        return "per-hand outcomes missing for some SFT checkpoint (or fewer than 4 OOD hands)"
    return _SftOutcomes(both["step"].to_numpy(), ids, ood[0], ood[2], idd[2])


def verdict_forgetting(acc: pl.DataFrame | None, attempts: pl.DataFrame | None, bench: Benchmark) -> tuple[Verdict, dict | None]:
    """docs/verdicts.md §forgetting; also returns the rule's arrays for `verdict_loss`."""
    finding = FINDINGS["forgetting"]
    o = _sft_outcomes(acc, attempts, bench)
    if isinstance(o, str):
        return Verdict(finding, o, "no data"), None
    r = {k: v[0] for k, v in judge_forgetting(o.ood[None], o.idd[None], o.ood_hands % 2).items()} | {"outcomes": o}
    row = {(x["ckpt_id"], x["split"]): x for x in acc.iter_rows(named=True)}
    b, s = row[(o.ids[r["b"]], "ood")], row[(o.ids[-1], "ood")]
    id_b, id_s = row[(o.ids[r["b"]], "id")], row[(o.ids[-1], "id")]
    picks = [int(o.steps[i]) for i in r["pick"]]
    evidence = (
        f"OOD peak on all hands at step {b['step']}: {_ci(b)}; B chosen on even / odd hands: step {picks[0]} / {picks[1]}, "
        f"held-out accuracy {_pct(r['held_out'])} vs S (step {s['step']}) {_ci(s)}: drop {_iv(r['drop'], r['drop_lo'], r['drop_hi'])}; "
        f"ID at B {_pct(id_b['accuracy'])} → at S {_pct(id_s['accuracy'])}: rise {_iv(r['rise'], r['rise_lo'], r['rise_hi'])}"
    )
    values = {
        "peak_step": b["step"], "ood_peak": b["accuracy"], "ood_peak_held_out": r["held_out"], "last_step": s["step"], "ood_last": s["accuracy"],
        "ood_drop": r["drop"], "ood_drop_low": r["drop_lo"], "id_at_peak": id_b["accuracy"], "id_last": id_s["accuracy"], "id_rise": r["rise"], "id_rise_low": r["rise_lo"],
    }  # fmt: skip
    if b.get("number_field") is not None and s.get("number_field") is not None:
        evidence += f"; OOD number field {_pct(b['number_field'])} → {_pct(s['number_field'])}"
        values |= {"ood_number_field_peak": b["number_field"], "ood_number_field_last": s["number_field"]}
    return Verdict(finding, evidence, WORDS[int(r["status"])], values), r


def verdict_loss(acc: pl.DataFrame | None, sft_log: pl.DataFrame | None, forgetting: dict | None) -> Verdict:
    finding = FINDINGS["loss"]
    if forgetting is None:
        return Verdict(finding, "no per-hand SFT evaluation (see forgetting)", "no data")
    if sft_log is None or "ce_ood" not in sft_log.columns or sft_log.drop_nulls("ce_ood").height < 2:
        return Verdict(finding, "no OOD reference CE logged during SFT", "no data")
    o: _SftOutcomes = forgetting["outcomes"]
    ce = sft_log.drop_nulls("ce_ood").sort("step")
    saved = np.sort(acc.filter(pl.col("split") == "ood")["step"].unique().to_numpy())
    k = o.ood.sum(1)
    r = {x: v[0] for x, v in judge_loss(k[None], o.ood.shape[1], o.steps, saved, np.array([forgetting["b"]]), np.array([forgetting["drop_lo"] > 0]), ce["step"].to_numpy(), ce["ce_ood"].to_numpy()[None]).items()}
    b = int(o.steps[forgetting["b"]])
    around = saved[max(0, np.searchsorted(saved, b) - 1) : np.searchsorted(saved, b) + 2].tolist()
    gaps = np.unique(np.diff(np.unique(ce["step"].to_numpy())))
    spacing = f"checkpoints around B at steps {', '.join(map(str, around))}; CE logged every {'/'.join(map(str, gaps[:3]))} steps"
    m = int(r["min_step"])
    evidence = f"OOD CE of the {ce_target(sft_log)} answer is lowest at step {m} ({ce.filter(pl.col('step') == m)['ce_ood'][0]:.3f} nats; at the last step {ce['ce_ood'][-1]:.3f}); OOD peak at step {b}, plausible peak steps {int(r['first'])}-{int(r['last'])}, peak window [{int(r['window_lo'])}, {int(r['window_hi'])}] ({spacing})"
    if forgetting["drop_lo"] <= 0:
        evidence += "; no significant OOD peak, so nothing for the loss to show"
    values = {"ce_ood_min_step": m, "ce_ood_min": float(ce["ce_ood"].min()), "ce_ood_last": float(ce["ce_ood"][-1]), "peak_window_lo_step": int(r["window_lo"]), "peak_window_hi_step": int(r["window_hi"])}
    return Verdict(finding, evidence, WORDS[int(r["status"])], values)


def verdict_window(rec: pl.DataFrame | None, attempts: pl.DataFrame | None, bench: Benchmark) -> Verdict:
    finding = FINDINGS["window"]
    if rec is not None:
        rec = rec.filter(pl.col("start_step") > 0)  # RL from the base (step 0) learns the format: not a recovery start
    if rec is None or rec.height < 3:
        return Verdict(finding, "fewer than three RL runs from SFT checkpoints (step > 0) evaluated" if rec is not None else "no RL results", "no data")
    paired = rl_outcomes(attempts, rec, bench)
    if paired is None or paired[0].shape[1] < 4:
        return Verdict(finding, "no per-hand OOD outcomes (eval_attempts) for the RL runs, or fewer than 4 hands", "no data")
    r = {k: v[0] for k, v in judge_window(*(x[None] for x in paired)).items()}
    words = np.where(r["healed"], "healed", np.where(r["hurt"], "hurt", "flat"))
    parts = [f"from {x['start_step']}: {_pct(x['ood_before'])} → {_pct(x['ood_after'])}, gain {_iv(g, lo, hi)} {w}" for x, g, lo, hi, w in zip(rec.iter_rows(named=True), r["gain"], r["low"], r["high"], words)]
    values = {f"gain_from_{s}": float(g) for s, g in zip(rec["start_step"], r["gain"])} | {f"healed_from_{s}": float(h) for s, h in zip(rec["start_step"], r["healed"])}
    note = "; no start heals (lack of power, not evidence of no window)" if not r["healed"].any() else ""
    edges = [w for w, e in zip(("earliest", "latest"), r["edge_heals"]) if e]
    if edges:
        note += f"; the {' and '.join(edges)} start heals at the simultaneous level (recovery not bounded on that side)"
    return Verdict(finding, "; ".join(parts) + f" (contrasts between starts at z = {r['z_pairs']:.2f}, edge starts at z = {r['z_starts']:.2f}){note}", WORDS[int(r["status"])], values)


def verdict_rotation(pairs: pl.DataFrame | None, roles: pl.DataFrame | None) -> Verdict:
    """B→S against the noise control of the same pair (analysis.md §3.8)."""
    from tasks.svd.engine import noise_id

    finding = FINDINGS["rotation"]
    if pairs is None or roles is None:
        return Verdict(finding, "no SVD results", "no data")
    ids = dict(zip(roles["role"], roles["ckpt_id"]))
    if "B" not in ids or "S" not in ids or ids["B"] == ids["S"]:
        return Verdict(finding, "B and S are not distinct checkpoints", "no data")
    cols = ["sdrift_mean_abs_rel_all", "angle_u_mean_deg", "energy_rotation"]
    valid = pairs.filter(pl.col("skip_reason").is_null() & (pl.col("ref_id") == ids["B"]) & pl.all_horizontal(pl.col(c).is_not_null() for c in cols))
    w = valid.filter((pl.col("comparison") == "weights") & (pl.col("tgt_id") == ids["S"]))
    noise = valid.filter((pl.col("comparison") == "noise_control") & (pl.col("tgt_id") == noise_id(ids["B"], ids["S"])))
    m = w.join(noise.select("param", "k", *[pl.col(c).alias(f"noise_{c}") for c in cols]), on=["param", "k"])
    m = m.filter((pl.col("noise_angle_u_mean_deg") > 0) & (pl.col("noise_energy_rotation") > 0) & (pl.col("angle_u_mean_deg") > 0) & (pl.col("energy_rotation") > 0))
    if m.is_empty():
        return Verdict(finding, f"no valid B→S rows with a matching noise control ({noise_id(ids['B'], ids['S'])})", "no data")
    per = (
        m.group_by("param")
        .agg(
            drift=pl.col("sdrift_mean_abs_rel_all").mean(),
            angle_ratio=(pl.col("angle_u_mean_deg") / pl.col("noise_angle_u_mean_deg")).log().mean().exp(),
            energy_ratio=(pl.col("energy_rotation") / pl.col("noise_energy_rotation")).log().mean().exp(),
            angle=pl.col("angle_u_mean_deg").mean(), noise_angle=pl.col("noise_angle_u_mean_deg").mean(),
            stretch=pl.col("energy_stretch").mean(), rotation=pl.col("energy_rotation").mean(), noise_rotation=pl.col("noise_energy_rotation").mean(),
        )
        .sort("param")
    )  # fmt: skip
    r = {k: v[0] for k, v in judge_rotation(*(per[c].to_numpy()[None] for c in ("drift", "angle_ratio", "energy_ratio"))).items()}
    n = per.height
    evidence = (
        f"B={ids['B']} → S={ids['S']}, {n} matrices, k-specs {', '.join(sorted(m['k_spec'].unique()))}: mean abs relative σ drift {r['drift']:.4f} (limit {SIGMA_DRIFT_MAX:g}); "
        f"mean top-k angle {per['angle'].mean():.2f}° vs {per['noise_angle'].mean():.2f}° for the same pair's noise control: ratio {r['angle_ratio']:.2f} "
        f"({int((per['angle_ratio'] > 1).sum())}/{n} matrices above 1, sign test p = {r['p_angle']:.3g}); "
        f"rotation energy {per['rotation'].mean():.4f} vs {per['noise_rotation'].mean():.4f}: ratio {r['energy_ratio']:.2f} ({int((per['energy_ratio'] > 1).sum())}/{n} above 1, p = {r['p_energy']:.3g}); "
        f"stretch energy {per['stretch'].mean():.4f}; margin {ROTATION_MARGIN:g}"
    )
    values = {"sigma_drift": r["drift"], "angle_deg": per["angle"].mean(), "noise_angle_deg": per["noise_angle"].mean(), "angle_ratio": r["angle_ratio"], "energy_rotation": per["rotation"].mean(), "noise_energy_rotation": per["noise_rotation"].mean(), "energy_rotation_ratio": r["energy_ratio"], "energy_stretch": per["stretch"].mean(), "n_matrices": n}
    return Verdict(finding, evidence, WORDS[int(r["status"])], values)


def verdict_edit(res: pl.DataFrame | None, variants: pl.DataFrame | None) -> dict[str, Verdict]:
    """The two questions on the claimed variants: `edit_some` (ρ > 0), `edit_most` (ρ ≥ 0.5)."""
    keys = ("edit_some", "edit_most")
    if res is None or variants is None:
        return {k: Verdict(FINDINGS[k], "no editing results", "no data") for k in keys}
    from tasks.edit import claim_variants

    claims = {v: k for k, v in claim_variants(variants).items() if v is not None}
    picks = res.join(variants, on="variant_id").filter((pl.col("split") == "OOD") & pl.col("variant_id").is_in(list(claims))).sort("variant_id")
    if picks.is_empty():
        return {k: Verdict(FINDINGS[k], "the two claimed variants were not run", "no data") for k in keys}
    skipped, judged = [], []
    for r in picks.iter_rows(named=True):
        what = f"layers {r['layers_spec']}" if r["layers_spec"] else f"top {r['k_top_spec']}"
        if r.get("n_matrices_edited") == 0:
            # e.g. the first quarter of a 2-layer model is no layer at all: no evidence either way
            skipped.append(f"{what}: edits no matrix of this model, no evidence")
        else:
            judged.append((what, r))
    if not judged:
        return {k: Verdict(FINDINGS[k], "; ".join(skipped), "no data") for k in keys}
    nan = float("nan")
    lo = np.array([[nan if r.get("recovery_ci_low") is None else r["recovery_ci_low"] for _, r in judged]])
    hi = np.array([[nan if r.get("recovery_ci_high") is None else r["recovery_ci_high"] for _, r in judged]])
    out = judge_recovery(lo, hi)
    values = {f"rho {what}": r["recovery_fraction"] for what, r in judged if r["recovery_fraction"] is not None}
    values |= {f"rho_low {what}": r["recovery_ci_low"] for what, r in judged if r.get("recovery_ci_low") is not None}
    values |= {f"rho_high {what}": r["recovery_ci_high"] for what, r in judged if r.get("recovery_ci_high") is not None}
    verdicts = {}
    for key, q in zip(keys, ("some", "most")):
        parts = []
        for (what, r), st in zip(judged, out[f"{q}_per_variant"][0]):
            if r["recovery_fraction"] is None:
                rho = "ρ undefined (no donor-target gap)"
            elif r.get("recovery_ci_low") is None:
                rho = f"ρ = {r['recovery_fraction']:.2f}, no interval (the donor-target gap is not significant)"
            else:
                rho = f"ρ = {r['recovery_fraction']:.2f} [{r['recovery_ci_low']:.2f}, {r['recovery_ci_high']:.2f}]"
            parts.append(f"{what}: {rho}: {WORDS[int(st)]}")
        # the numbers once, on the first question, so replicates do not list them twice
        verdicts[key] = Verdict(FINDINGS[key], "; ".join(parts + skipped), WORDS[int(out[q][0])], values if q == "some" else {})
    return verdicts


def verdict_monitor(sel: pl.DataFrame | None, attempts: pl.DataFrame | None, bench: Benchmark) -> Verdict:
    finding = FINDINGS["monitor"]
    if sel is None:
        return Verdict(finding, "no drift stage (drift.enabled is off)", "no data")
    picks = {r["rule"]: r for r in sel.iter_rows(named=True)}
    if missing := [r for r in ("monitor", *LOSS_RULES) if r not in picks]:
        return Verdict(finding, f"drift_selection has no pick for {', '.join(missing)}", "no data")
    from tasks.drift import monitor

    if (picks["monitor"]["signal"], picks["monitor"]["rho"]) != (monitor.SIGNAL, monitor.RHO):
        # chosen after drift_correlations could show which signal tracks OOD: not the rule
        # fixed in advance, so not evidence for it
        return Verdict(finding, f"the picks use drift.signal {picks['monitor']['signal']} and rho {picks['monitor']['rho']:g}, not the rule fixed before any result ({monitor.SIGNAL}, {monitor.RHO:g}): exploratory, not judged", "no data")
    ids = list(dict.fromkeys(picks[r]["ckpt_id"] for r in ("monitor", *LOSS_RULES)))
    m = None if attempts is None else solved_matrix(attempts, "ood", ids, bench)
    if m is None or len(m[0]) < 4:
        return Verdict(finding, "no per-hand OOD outcomes (eval_attempts) of the picked checkpoints, or fewer than 4 hands", "no data")
    row = {c: m[2][i] for i, c in enumerate(m[1])}
    r = judge_monitor(row[picks["monitor"]["ckpt_id"]][None], np.stack([row[picks[k]["ckpt_id"]] for k in LOSS_RULES])[None])
    mon = picks["monitor"]
    parts = [f"the monitor picks step {mon['step']} (OOD {_pct(mon['accuracy_ood'])}, {mon['signal']}, ρ {mon['rho']:g})"]
    for j, (k, words) in enumerate(LOSS_RULES.items()):
        parts.append(f"{words} step {picks[k]['step']} (OOD {_pct(picks[k]['accuracy_ood'])}): difference {_iv(r['diff'][0, j], r['low'][0, j], r['high'][0, j])}")
    if "oracle" in picks:
        parts.append(f"OOD-best step {picks['oracle']['step']} ({_pct(picks['oracle']['accuracy_ood'])}), last step {picks['last']['step']} ({_pct(picks['last']['accuracy_ood'])})")
    values = {"monitor_step": mon["step"], "monitor_ood": mon["accuracy_ood"], **{f"{k}_step": picks[k]["step"] for k in LOSS_RULES}, **{f"minus_{k}": float(r["diff"][0, j]) for j, k in enumerate(LOSS_RULES)}}
    return Verdict(finding, "; ".join(parts), WORDS[int(r["status"][0])], values)


def all_verdicts(t: dict[str, pl.DataFrame], acc: pl.DataFrame | None, rec: pl.DataFrame | None, bench: Benchmark) -> dict[str, Verdict]:
    """The findings (keys of FINDINGS), judged on one study's tables and its `sft_accuracy`
    and `rl_recovery` views."""
    attempts = t.get("eval_attempts")
    forgetting, arrays = verdict_forgetting(acc, attempts, bench)
    return {
        "forgetting": forgetting,
        "loss": verdict_loss(acc, t.get("sft_log"), arrays),
        "window": verdict_window(rec, attempts, bench),
        "rotation": verdict_rotation(t.get("svd_pair_metrics"), t.get("checkpoint_roles")),
        **verdict_edit(t.get("edit_eval_results"), t.get("edit_variants")),
        "monitor": verdict_monitor(t.get("drift_selection"), attempts, bench),
    }


# ---------------------------------------------------------------------------- document


def _md_table(df: pl.DataFrame, fmt: str = ".4f") -> str:
    cols = df.columns
    def cell(v):
        return "" if v is None else (f"{v:{fmt}}" if isinstance(v, float) else str(v))
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.iter_rows()]
    return "\n".join(rows)


def build(tables_dir: Path, out: Path, title: str, bench: Benchmark) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t = read_tables(tables_dir)
    acc, rec = sft_accuracy(t, bench), rl_recovery(t, bench)
    sections, figures, absent = [], [], []

    def section(name: str, ok: bool, body):
        if ok:
            sections.append(f"## {name}\n\n" + body())
        else:
            absent.append(name)
            sections.append(f"## {name}\n\n*Absent: the tables it needs are not in this study yet.*\n")

    def with_fig(path: Path | None, text: str = "") -> str:
        if path is None:
            return text or "*No data to plot.*\n"
        figures.append(path)
        return f"![{path.stem}]({path.name})\n\n{text}"

    cols = ["ckpt_id", "step", "split", "n", "k", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "first_attempt_accuracy", "format_error_rate"]
    if acc is not None:  # the task's own columns: the summary metrics it names, its report columns
        cols += [c for c in acc.columns if c not in cols and (c in bench.report_metrics or c not in t["eval_summary"].columns)]
    section("Accuracy during SFT and after RL", acc is not None, lambda: with_fig(fig_accuracy(acc, rec, out, bench), _md_table(acc.select([c for c in cols if c in acc.columns])) + "\n"))
    section("RL recovery", rec is not None, lambda: _md_table(rec.select("start_step", "updates", "n", "k_before", "ood_before", "k_after", "ood_after", "gain", "gain_low", "gain_high", "status")) + "\n\nGain: OOD after RL minus before, paired over the same hands, with its 95 % interval; healed / hurt when the interval excludes 0.\n")
    starts = rl_starts(t, rec)
    section("RL per start", starts is not None, lambda: _md_table(starts) + "\n\nID accuracy before and after RL (Wilson 95 %); rollout reward (ID hands, rollout temperature) averaged over the first and last fifth of the updates; raw advantages: mean interquartile range and 5-95 % spread per update, and the normalised entropy of the run's histogram (1 = flat, 0 = one bin).\n")
    section("Format errors", acc is not None, lambda: with_fig(fig_format_errors(acc, out)))
    section("Losses", "sft_log" in t, lambda: with_fig(fig_losses(t["sft_log"], acc, out)))
    section("Singular values and vectors", "svd_pair_metrics" in t and "checkpoints" in t, lambda: with_fig(fig_svd(t["svd_pair_metrics"], t["checkpoints"], "angle_u_mean_deg", out)))
    section("RL advantage distribution", "rl_log" in t and "adv_q50" in t.get("rl_log", pl.DataFrame()).columns, lambda: with_fig(fig_advantages(t["rl_log"], out)))
    section("Rotation editing", "edit_eval_results" in t and "edit_variants" in t, lambda: with_fig(fig_edit(t["edit_eval_results"], t["edit_variants"], out), edit_table(t["edit_eval_results"], t["edit_variants"])))
    section("Hidden states of B, S and R", "hidden_pair_metrics" in t and "hidden_recovery" in t and t["hidden_pair_metrics"].height > 0, lambda: hidden_table(t["hidden_pair_metrics"], t["hidden_recovery"]))

    verdicts = list(all_verdicts(t, acc, rec, bench).values())
    vtable = "| finding | this study's evidence (95 % intervals) | verdict |\n|---|---|---|\n" + "\n".join(f"| {v.finding} | {v.evidence} | **{v.verdict}** |" for v in verdicts)
    md = "\n".join([f"# {title}\n", "## Verdicts\n", vtable, "", rules_markdown(), "", *sections])
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(to_html(md, out))
    return {"figures": [p.name for p in figures], "absent": absent, "verdicts": [v.__dict__ for v in verdicts]}


def rules_markdown() -> str:
    """The verdict rules as implemented (`rules()`), for the report's header and docs/verdicts.md."""
    lines = ["How each verdict is reached (docs/verdicts.md gives each rule's null hypothesis, false-positive rate and power, measured by simulation). Paper values are approximate (±0.3 pp read-off, ±2.5 pp sampling error, one seed).", ""]
    return "\n".join(lines + [f"- **{key}**: {text}" for key, text in rules().items()])


HIDDEN_METRICS = ("cosine_mean", "cka", "mmd2", "js", "kl_forward", "jaccard_top10")  # one of each kind; the tables hold all


def hidden_table(pairs: pl.DataFrame, recovery: pl.DataFrame) -> str:
    """The drift stage's B / S / R comparison (analysis.md §5): each pair's values and RL's
    recovery Δ, for a few of the metrics. Described, not judged: no verdict reads it."""
    ids = dict(pairs.select("model_x", "x_id").rows()) | dict(pairs.select("model_y", "y_id").rows())
    shown = pairs.filter(pl.col("metric").is_in(HIDDEN_METRICS), pl.col("model_x") != pl.col("model_y"))
    wide = shown.with_columns(pair=pl.format("{}-{} {}", "model_x", "model_y", "split")).pivot(on="pair", index="metric", values="value", aggregate_function="first")
    rec = recovery.filter(pl.col("metric").is_in(HIDDEN_METRICS)).select("split", "metric", "delta", "delta_norm", "win_rate").sort("split", "metric")
    n = pairs["n_prompts"].max() if pairs.height else 0
    same = " B = S (the last SFT checkpoint is the OOD-best): the (B, S) pair is one model, whose distances are 0 up to rounding; Δ norm is left empty." if ids.get("B") == ids.get("S") else ""
    head = f"B = {ids.get('B')}, S = {ids.get('S')}, R = {ids.get('R', 'absent')}; {n} prompts per split, read at the answer anchor (docs/monitor.md).{same}\n\n"
    tail = "\n\nΔ > 0: R is closer to B than S is (similarity: s(B,R) − s(B,S); distance: δ(B,S) − δ(B,R)); Δ norm: over the (B,S) value; win-rate: the share of prompts where R is closer (ties ½). Not a verdict: a description of where RL moved the states.\n"
    return head + _md_table(wide, fmt=".4g") + "\n\n" + (_md_table(rec, fmt=".4g") if rec.height else "*No R: no recovery.*") + tail


def edit_table(res: pl.DataFrame, variants: pl.DataFrame) -> str:
    cols = ["experiment", "method", "k_top_spec", "k_tail_spec", "layers_spec", "split", "n_hands", "n_correct", "accuracy", "recovery_fraction", "recovery_ci_low", "recovery_ci_high"]
    d = res.join(variants, on="variant_id")
    return _md_table(d.select([c for c in cols if c in d.columns]).sort("experiment", "method", "split")) + "\n"


def to_html(md: str, out: Path) -> str:
    """A self-contained page: the markdown as preformatted text blocks and tables, figures inlined."""
    import html

    body = []
    for block in md.split("\n\n"):
        if m := re.fullmatch(r"!\[(.*?)\]\((.*?)\)", block.strip()):
            data = base64.b64encode((out / m.group(2)).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}" style="max-width:100%">')
        elif block.lstrip().startswith("|"):
            rows = [r for r in block.strip().splitlines() if not re.fullmatch(r"\|(-+\|)+", r.strip())]
            cells = [[html.escape(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
            head = "".join(f"<th>{c}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
            body.append(f"<table border=1 cellspacing=0 cellpadding=3><tr>{head}</tr>{rest}</table>")
        elif block.startswith("#"):
            level = len(block) - len(block.lstrip("#"))
            body.append(f"<h{level}>{html.escape(block.lstrip('#').strip())}</h{level}>")
        else:
            body.append(f"<p>{html.escape(block)}</p>")
    return "<!doctype html><meta charset=utf-8><title>rlheal report</title><body style='font-family:sans-serif;max-width:1200px;margin:auto'>" + "\n".join(body) + "</body>"


# ---------------------------------------------------------------------------- stage


INPUTS = "inputs.json"  # what a report folder was built from: the same inputs, the same report


ROOT = Path(__file__).resolve().parents[1]  # the project: its tasks/ and rlheal/ draw the report


def inputs(tables: Path, title: str, task: str, root: Path = ROOT) -> dict:
    """Every table's content hash, the title, the task, and what draws the report: every
    source file and data file of `tasks/` and `rlheal/` by its path (the report reads the
    task's module, the paper's curve, the edit grid, the RL log's helpers, ...) and the
    plotting and table libraries' versions. Conservative: any code change redraws it."""
    import importlib.metadata as md

    code = sorted(p for d in ("tasks", "rlheal") for p in (root / d).rglob("*") if p.suffix in (".py", ".csv") and "shipped" not in p.parts)
    return {
        "version": STAGE.version,
        "title": title,
        "task": task,
        "code": {p.relative_to(root).as_posix(): sha256_file(p) for p in code},
        "libraries": {lib: md.version(lib) for lib in ("matplotlib", "polars", "numpy", "scipy")},
        "tables": {p.name: sha256_file(p) for p in sorted(Path(tables).glob("*.parquet"))},
    }


def run(tables: Path, out: Path, title: str, task: str) -> Path:
    """Build the report folder `out` from the study tables in `tables` (a study of `task`),
    swapped in atomically; kept as it is when it was built from the same inputs (a re-run of
    a finished study redraws nothing)."""
    from rlheal.store import replace_dir

    final, want = Path(out), inputs(Path(tables), title, task)
    if (final / INPUTS).is_file() and json.loads((final / INPUTS).read_text()) == want:
        log.info("report: up to date (%s)", final)
        return final

    def make(tmp: Path) -> dict:
        info = build(Path(tables), tmp, title, benchmark.get(task))
        (tmp / INPUTS).write_text(json.dumps(want, indent=1))
        return info

    info = replace_dir(final, make)
    log.info("report: %d figures, absent sections: %s", len(info["figures"]), ", ".join(info["absent"]) or "none")
    return final


def inline_figures(markdown: str, folder: Path) -> str:
    """The report with its figures as data URIs: the Prefect UI renders an artifact's
    markdown in the browser, which cannot read the store's files (issue 18: a path relative
    to the report folder showed as a broken image)."""

    def data_uri(m: re.Match) -> str:
        png = folder / m.group(2)
        if not png.is_file():
            return m.group(0)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"

    return re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", data_uri, markdown)


@task(name=STAGE.name, task_run_name="report", cache_policy=NO_CACHE)  # cheap, and must see the latest tables
def stage(tables: str, out: str, title: str, task: str) -> str:
    from rlheal.faults import maybe_fail

    maybe_fail("report")
    final = run(Path(tables), Path(out), title, task)
    try:
        from prefect.artifacts import create_markdown_artifact

        from rlheal.progress import artifact_key

        create_markdown_artifact(inline_figures((final / "report.md").read_text(), final), key=artifact_key(title, "report"), description=f"{title}: report ({final})")
    except Exception as err:  # the UI copy must never fail the study
        log.warning("could not publish the report artifact: %s", err)
    return str(final)
