"""Stage `report`: figures and verdicts from the study's Parquet tables alone.

`build(tables_dir, out_dir)` writes PNG figures, `report.md` and a self-contained
`report.html` (figures inlined). Every section appears when its table exists and
says so when it does not. The paper's numbers (paper_reference.csv) are always
labelled as the paper's, never mixed with the study's.
"""

from __future__ import annotations

import base64
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

log = logging.getLogger("rlheal.report")
PAPER_CSV = Path(__file__).with_name("paper_reference.csv")
VERSION = "1"
PAPER_SE_PP = 2.5  # sampling error of one 234-hand evaluation near 17.5 % (paper_results.md)


def read_tables(tables_dir: Path) -> dict[str, pl.DataFrame]:
    return {p.stem: pl.read_parquet(p) for p in sorted(Path(tables_dir).glob("*.parquet"))}


# ---------------------------------------------------------------------------- views


def sft_accuracy(t: dict[str, pl.DataFrame]) -> pl.DataFrame | None:
    """Accuracy per SFT step and split (base = step 0), from eval_summary."""
    if "eval_summary" not in t:
        return None
    s = t["eval_summary"].filter(pl.col("stage").is_in(["base", "sft"]))
    if (nf := number_field(t)) is not None:
        s = s.join(nf, on=["ckpt_id", "split"], how="left")
    return s.sort("split", "step") if s.height else None


def number_field(t: dict[str, pl.DataFrame]) -> pl.DataFrame | None:
    """Per checkpoint and split: the share of first attempts whose `"number"` list is the
    hand's values under the split's rule. It shows how well the model still reads the
    face-card rule, which at small scale moves long before accuracy does."""
    if "eval_attempts" not in t or not any(f"eval_{s}" in t for s in ("id", "ood")):
        return None
    hands = pl.concat([t[f"eval_{s}"].select("split", pl.col("index").alias("hand_index"), "numbers") for s in ("id", "ood") if f"eval_{s}" in t])
    first = t["eval_attempts"].filter(pl.col("attempt") == 1).join(hands, on=["split", "hand_index"])
    written = pl.col("response").str.extract(r'"number": \[([^\]]*)\]', 1).str.split(", ").cast(pl.List(pl.Int64), strict=False)
    right = (written == pl.col("numbers")).fill_null(False)
    return first.group_by("ckpt_id", "split").agg(number_field=right.mean())


def rl_recovery(t: dict[str, pl.DataFrame]) -> pl.DataFrame | None:
    """OOD accuracy before RL (the starting SFT checkpoint) and after (the run's last update)."""
    if "eval_summary" not in t or "checkpoints" not in t:
        return None
    ck = t["checkpoints"]
    if "rl_start_step" not in ck.columns or ck.filter(pl.col("stage") == "rl").is_empty():
        return None
    ev = t["eval_summary"].filter(pl.col("split") == "ood")
    final = ck.filter(pl.col("stage") == "rl").sort("step").group_by("rl_start_step").last()
    after = final.join(ev, on="ckpt_id").select(pl.col("rl_start_step").alias("start_step"), pl.col("step").alias("updates"), pl.col("accuracy").alias("ood_after"), pl.col("accuracy_ci_low").alias("after_low"), pl.col("accuracy_ci_high").alias("after_high"), pl.col("k").alias("k_after"))
    before = ev.filter(pl.col("stage").is_in(["base", "sft"])).select(pl.col("step").alias("start_step"), pl.col("accuracy").alias("ood_before"), pl.col("accuracy_ci_low").alias("before_low"), pl.col("accuracy_ci_high").alias("before_high"), pl.col("k").alias("k_before"), "n")
    out = after.join(before, on="start_step").sort("start_step")
    return out.with_columns(gain=pl.col("ood_after") - pl.col("ood_before"), healed=pl.col("after_low") > pl.col("before_high"))


def paper(model: str = "Llama-3.2-11B-Vision-Instruct") -> pl.DataFrame:
    ref = pl.read_csv(PAPER_CSV, schema_overrides={"sft_step": pl.Int64})
    return ref.filter((pl.col("model") == model) & pl.col("source").str.starts_with("fig:llama_ood_recovery_line"))


# ---------------------------------------------------------------------------- figures


def _save(fig, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig_accuracy(acc: pl.DataFrame, rec: pl.DataFrame | None, out: Path) -> Path:
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
    p = paper()
    for stage, style in (("sft", "o-"), ("rl", "s--")):
        d = p.filter(pl.col("stage").is_in([stage, "base"] if stage == "sft" else [stage])).sort("sft_step")
        axp.errorbar(d["sft_step"], d["accuracy_pct"], yerr=PAPER_SE_PP, fmt=style, capsize=2, label="paper: OOD after SFT" if stage == "sft" else "paper: OOD after RL from step")
    axp.axvspan(420, 1200, color="tab:green", alpha=0.08, label="paper: recovery window")
    axp.set(xlabel="SFT step", ylabel="OOD accuracy (%)", title="PAPER (Jin et al. 2025, Llama-3.2-11B, ±2.5 pp SE)")
    axp.legend(fontsize=8)
    return _save(fig, out, "fig1_accuracy_vs_sft_step")


def fig_format_errors(acc: pl.DataFrame, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for split, color in (("id", "tab:blue"), ("ood", "tab:red")):
        d = acc.filter(pl.col("split") == split)
        ax.plot(d["step"], 100 * d["format_error_rate"], "o-", color=color, label=split.upper())
    ax.set(xlabel="SFT step", ylabel="format error rate (% of attempts)", title="Format errors during SFT")
    ax.legend()
    return _save(fig, out, "fig2_format_errors")


def fig_losses(sft_log: pl.DataFrame, acc: pl.DataFrame | None, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = sft_log.drop_nulls("train_loss")
    ax.plot(tr["step"], tr["train_loss"], color="gray", label="train loss")
    ce = sft_log.drop_nulls("ce_ood")
    if ce.height:
        ax.plot(ce["step"], ce["ce_ood"], "o-", color="tab:red", label="OOD reference CE")
        ax.plot(ce["step"], ce["ce_id"], "o-", color="tab:blue", label="ID reference CE")
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


def fig_editing(res: pl.DataFrame, variants: pl.DataFrame, out: Path) -> Path | None:
    d = res.join(variants, on="variant_id").filter(pl.col("method") != "none")
    if d.is_empty():
        return None
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for (method,), g in d.filter(pl.col("layers_spec").is_null()).group_by("method", maintain_order=True):
        for split, ax in (("OOD", axes[0]), ("ID", axes[1])):
            s = g.filter(pl.col("split") == split).sort("k_top_spec")
            ax.plot(s["k_top_spec"], 100 * s["accuracy"], "o-", label=method)
        r = g.filter(pl.col("split") == "OOD").sort("k_top_spec")
        axes[2].plot(r["k_top_spec"], r["recovery_fraction"], "o-", label=method)
    for ax, title in zip(axes, ("OOD accuracy (%)", "ID accuracy (%)", "recovery fraction")):
        ax.set(xlabel="k_top", title=title)
        ax.legend(fontsize=7)
    axes[2].axhspan(0.7, 0.8, color="tab:green", alpha=0.1, label="claim: 70-80 %")
    return _save(fig, out, "fig6_editing")


# ---------------------------------------------------------------------------- verdicts


# The paper's four findings, in report order; the keys name them in tables (replicates).
FINDINGS = {
    "forgetting": "OOD accuracy peaks early in SFT, then falls while ID keeps rising; loss does not show the peak",
    "window": "RL restores OOD ability only from checkpoints inside a window (not too early, not too late)",
    "rotation": "Singular values barely move while singular vectors rotate",
    "editing": "Restoring singular directions (top 20 %, or the first 25 % of layers) recovers OOD ability",
}


@dataclass
class Verdict:
    finding: str
    evidence: str
    verdict: str  # supported | not supported | inconclusive | no data
    values: dict[str, float] = field(default_factory=dict)  # the evidence's numbers, for comparing replicates


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _ci(row: dict, prefix: str = "accuracy") -> str:
    return f"{_pct(row[prefix])} [{_pct(row[prefix + '_ci_low'])}, {_pct(row[prefix + '_ci_high'])}] ({row['k']}/{row['n']})"


def verdict_forgetting(acc: pl.DataFrame | None, sft_log: pl.DataFrame | None) -> Verdict:
    finding = FINDINGS["forgetting"]
    if acc is None:
        return Verdict(finding, "no evaluation results", "no data")
    ood = acc.filter((pl.col("split") == "ood") & (pl.col("step") > 0)).sort("step")
    idd = acc.filter(pl.col("split") == "id").sort("step")
    if ood.height < 2:
        return Verdict(finding, "fewer than two SFT checkpoints evaluated", "no data")
    b = ood.sort(["accuracy", "step"], descending=[True, False]).row(0, named=True)
    s = ood.row(-1, named=True)
    id_b = idd.filter(pl.col("step") == b["step"]).row(0, named=True)
    id_s = idd.row(-1, named=True)
    loss = ""
    if sft_log is not None and sft_log.drop_nulls("ce_ood").height:
        m = sft_log.drop_nulls("ce_ood").sort("ce_ood").row(0, named=True)
        loss = f"; OOD reference CE is lowest at step {m['step']} ({m['ce_ood']:.3f} nats)"
    evidence = f"OOD peak at step {b['step']}: {_ci(b)}; at the last step {s['step']}: {_ci(s)}; ID {_pct(id_b['accuracy'])} → {_pct(id_s['accuracy'])}{loss}"
    values = {"peak_step": b["step"], "ood_peak": b["accuracy"], "last_step": s["step"], "ood_last": s["accuracy"], "id_at_peak": id_b["accuracy"], "id_last": id_s["accuracy"], "ood_drop": b["accuracy"] - s["accuracy"]}
    if b.get("number_field") is not None and s.get("number_field") is not None:
        evidence += f"; OOD number field {_pct(b['number_field'])} → {_pct(s['number_field'])}"
        values |= {"ood_number_field_peak": b["number_field"], "ood_number_field_last": s["number_field"]}
    if loss:
        values |= {"ce_ood_min_step": m["step"], "ce_ood_min": m["ce_ood"], "ce_ood_last": sft_log.drop_nulls("ce_ood").sort("step")["ce_ood"][-1]}
    if b["accuracy_ci_low"] <= s["accuracy_ci_high"]:
        return Verdict(finding, evidence, "inconclusive", values)  # the peak and the end overlap
    # the peak is significantly above the end; forgetting needs ID not to fall meanwhile
    return Verdict(finding, evidence, "supported" if id_s["accuracy"] >= id_b["accuracy"] else "not supported", values)


def verdict_window(rec: pl.DataFrame | None) -> Verdict:
    finding = FINDINGS["window"]
    if rec is None or rec.height < 3:
        return Verdict(finding, "fewer than three RL runs evaluated" if rec is not None else "no RL results", "no data")
    parts = [f"from {r['start_step']}: {_pct(r['ood_before'])} → {_pct(r['ood_after'])} [{_pct(r['after_low'])}, {_pct(r['after_high'])}]" for r in rec.iter_rows(named=True)]
    healed = rec["healed"].to_list()
    inner = any(healed[1:-1])
    ends = healed[0] or healed[-1]
    verdict = "supported" if inner and not ends else ("not supported" if not any(healed) and (rec["after_high"] < rec["before_low"]).any() else "inconclusive")
    values = {f"gain_from_{r['start_step']}": r["gain"] for r in rec.iter_rows(named=True)} | {f"healed_from_{r['start_step']}": float(r["healed"]) for r in rec.iter_rows(named=True)}
    return Verdict(finding, "; ".join(parts), verdict, values)


def verdict_rotation(pairs: pl.DataFrame | None, roles: pl.DataFrame | None) -> Verdict:
    """Judged on the forgetting segment B→S against its own noise control (analysis.md §3.8)."""
    finding = FINDINGS["rotation"]
    if pairs is None or roles is None:
        return Verdict(finding, "no SVD results", "no data")
    ids = dict(zip(roles["role"], roles["ckpt_id"]))
    if "B" not in ids or "S" not in ids or ids["B"] == ids["S"]:
        return Verdict(finding, "B and S are not distinct checkpoints", "no data")
    valid = pl.col("skip_reason").is_null() & (pl.col("ref_id") == ids["B"])
    w = pairs.filter(valid & (pl.col("comparison") == "weights") & (pl.col("tgt_id") == ids["S"]))
    noise = pairs.filter(valid & (pl.col("comparison") == "noise_control"))
    if w.is_empty():
        return Verdict(finding, "no valid comparisons", "no data")
    drift = w["sdrift_mean_abs_rel_all"].mean()
    rot = w["energy_rotation"].mean()
    stretch = w["energy_stretch"].mean()
    angle = w["angle_u_mean_deg"].mean()
    noise_angle = noise["angle_u_mean_deg"].mean() if noise.height else float("nan")
    evidence = f"B={ids['B']} → S={ids['S']}: mean abs relative σ drift {drift:.4f}; mean top-k angle {angle:.2f}° (noise control of the same ‖ΔW‖: {noise_angle:.2f}°); ΔW energy in the top-k block: stretch {stretch:.3f}, rotation {rot:.3f}"
    values = {"sigma_drift": drift, "angle_deg": angle, "noise_angle_deg": noise_angle, "angle_over_noise_deg": angle - noise_angle, "energy_rotation": rot, "energy_stretch": stretch}
    if math.isnan(noise_angle):
        return Verdict(finding, evidence, "inconclusive", values)
    return Verdict(finding, evidence, "supported" if drift < 0.01 and angle > noise_angle and rot > stretch else "not supported", values)


def verdict_editing(res: pl.DataFrame | None, variants: pl.DataFrame | None) -> Verdict:
    finding = FINDINGS["editing"]
    if res is None or variants is None:
        return Verdict(finding, "no editing results", "no data")
    from tasks.editing import claim_variants

    claims = {v: k for k, v in claim_variants(variants).items() if v is not None}
    picks = res.join(variants, on="variant_id").filter((pl.col("split") == "OOD") & pl.col("variant_id").is_in(list(claims)))
    if picks.is_empty():
        return Verdict(finding, "the two claimed variants were not run", "no data")
    parts, verdicts, values = [], [], {}
    for r in picks.iter_rows(named=True):
        lo, hi = r.get("recovery_ci_low"), r.get("recovery_ci_high")
        what = f"layers {r['layers_spec']}" if r["layers_spec"] else f"top {r['k_top_spec']}"
        if r.get("n_matrices_edited") == 0:
            # e.g. the first quarter of a 2-layer model is no layer at all: no evidence either way
            parts.append(f"{what}: edits no matrix of this model, no evidence")
            continue
        if r["recovery_fraction"] is not None:
            values[f"rho {what}"] = r["recovery_fraction"]
        parts.append(f"{what}: ρ = {r['recovery_fraction']:.2f} [{lo if lo is None else f'{lo:.2f}'}, {hi if hi is None else f'{hi:.2f}'}]" if r["recovery_fraction"] is not None else f"{what}: ρ undefined (no gap)")
        verdicts.append("inconclusive" if lo is None else ("supported" if lo > 0 else "not supported"))
    if not verdicts:
        return Verdict(finding, "; ".join(parts), "no data", values)
    verdict = "supported" if all(v == "supported" for v in verdicts) else ("not supported" if all(v == "not supported" for v in verdicts) else "inconclusive")
    return Verdict(finding, "; ".join(parts), verdict, values)


def all_verdicts(t: dict[str, pl.DataFrame], acc: pl.DataFrame | None, rec: pl.DataFrame | None) -> dict[str, Verdict]:
    """The paper's four findings (keys of FINDINGS), judged on one study's tables and its
    `sft_accuracy` and `rl_recovery` views."""
    return {
        "forgetting": verdict_forgetting(acc, t.get("sft_log")),
        "window": verdict_window(rec),
        "rotation": verdict_rotation(t.get("svd_pair_metrics"), t.get("checkpoint_roles")),
        "editing": verdict_editing(t.get("edit_eval_results"), t.get("edit_variants")),
    }


# ---------------------------------------------------------------------------- document


def _md_table(df: pl.DataFrame, floats: int = 4) -> str:
    cols = df.columns
    def cell(v):
        return "" if v is None else (f"{v:.{floats}f}" if isinstance(v, float) else str(v))
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows += ["| " + " | ".join(cell(v) for v in r) + " |" for r in df.iter_rows()]
    return "\n".join(rows)


def build(tables_dir: Path, out: Path, title: str = "rlheal study") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t = read_tables(tables_dir)
    acc, rec = sft_accuracy(t), rl_recovery(t)
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

    cols = ["ckpt_id", "step", "split", "n", "k", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "first_attempt_accuracy", "format_error_rate", "number_field"]
    section("Accuracy during SFT and after RL", acc is not None, lambda: with_fig(fig_accuracy(acc, rec, out), _md_table(acc.select([c for c in cols if c in acc.columns])) + "\n"))
    section("RL recovery", rec is not None, lambda: _md_table(rec.select("start_step", "updates", "n", "k_before", "ood_before", "k_after", "ood_after", "after_low", "after_high", "healed")) + "\n")
    section("Format errors", acc is not None, lambda: with_fig(fig_format_errors(acc, out)))
    section("Losses", "sft_log" in t, lambda: with_fig(fig_losses(t["sft_log"], acc, out)))
    section("Singular values and vectors", "svd_pair_metrics" in t and "checkpoints" in t, lambda: with_fig(fig_svd(t["svd_pair_metrics"], t["checkpoints"], "angle_u_mean_deg", out)))
    section("RL advantage distribution", "rl_log" in t and "adv_q50" in t.get("rl_log", pl.DataFrame()).columns, lambda: with_fig(fig_advantages(t["rl_log"], out)))
    section("Rotation editing", "edit_eval_results" in t and "edit_variants" in t, lambda: with_fig(fig_editing(t["edit_eval_results"], t["edit_variants"], out)))

    verdicts = list(all_verdicts(t, acc, rec).values())
    vtable = "| finding | this study's evidence (95 % intervals) | verdict |\n|---|---|---|\n" + "\n".join(f"| {v.finding} | {v.evidence} | **{v.verdict}** |" for v in verdicts)
    md = "\n".join(
        [f"# {title}\n", "## Verdicts\n", "Computed from the tables; *inconclusive* when the intervals overlap. Paper values are approximate (±0.3 pp read-off, ±2.5 pp sampling error, one seed).\n", vtable, "", *sections]
    )
    (out / "report.md").write_text(md)
    (out / "report.html").write_text(to_html(md, out))
    return {"figures": [p.name for p in figures], "absent": absent, "verdicts": [v.__dict__ for v in verdicts]}


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


def run(study_dir: Path, title: str) -> Path:
    """Rebuild `<study>/report/` from `<study>/tables/`, swapped in atomically."""
    from rlheal.store import replace_dir

    final = Path(study_dir) / "report"
    info = replace_dir(final, lambda tmp: build(Path(study_dir) / "tables", tmp, title))
    log.info("report: %d figures, absent sections: %s", len(info["figures"]), ", ".join(info["absent"]) or "none")
    return final


@task(name="report", task_run_name="report", cache_policy=NO_CACHE)  # cheap, and must see the latest tables
def stage(study_dir: str, title: str) -> str:
    from rlheal.faults import maybe_fail

    maybe_fail("report")
    final = run(Path(study_dir), title)
    try:
        from prefect.artifacts import create_markdown_artifact

        from rlheal.progress import artifact_key

        create_markdown_artifact((final / "report.md").read_text(), key=artifact_key(title, "report"), description=f"{title}: report ({final})")
    except Exception as err:  # the UI copy must never fail the study
        log.warning("could not publish the report artifact: %s", err)
    return str(final)
