"""Replicates: the paper's findings judged on several runs of one study that differ only in
their seeds, side by side.

A study's verdicts rest on one training run; whether a finding holds at a given scale is a
question about the spread over seeds. Run the replicates as separate studies on one store
(data, model and pretrained base are shared through the cache):

    rlheal run configs/toy.yaml --set name=toy-seed1 --set data.train_seed=1 --set rl.seed=1
    rlheal compare toy toy-seed1 toy-seed2 --store store

`compare` judges each study with the report's own verdict functions and writes
`<store>/replicates/<names>/`: `replicates.parquet` (one row per study, finding and
number), `replicates.md` and `fig_replicates.png`.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from rlheal.config import ConfigError  # noqa: E402
from rlheal.store import replace_dir  # noqa: E402
from tasks import benchmark, report  # noqa: E402
from tasks.benchmark import Benchmark  # noqa: E402

class ReplicateError(ConfigError):
    """A study to compare is missing or has no tables (bad input: the message names its folder)."""


def study_tables(tables: Path) -> dict[str, pl.DataFrame]:
    """A study's tables (its `studies/<name>/tables/` folder)."""
    tables = Path(tables)
    if not tables.is_dir() or not any(tables.glob("*.parquet")):
        raise ReplicateError(f"{tables.parent}: no study tables here (run the study first, or check its name and --store)")
    return report.read_tables(tables)


def judge(verdicts: dict[str, dict[str, report.Verdict]]) -> pl.DataFrame:
    """One row per (study, finding, number) with the study's verdict on that finding."""
    rows = []
    for name, per_finding in verdicts.items():
        for key, v in per_finding.items():
            numbers = {m: x for m, x in v.values.items() if x is not None} or {"": None}
            rows += [{"study": name, "finding": key, "verdict": v.verdict, "metric": m, "value": None if x is None else float(x), "evidence": v.evidence} for m, x in numbers.items()]
    return pl.DataFrame(rows, schema={"study": pl.String, "finding": pl.String, "verdict": pl.String, "metric": pl.String, "value": pl.Float64, "evidence": pl.String})


def overall(verdicts: list[str]) -> str:
    """The same verdict on every replicate, or a count of each."""
    if len(set(verdicts)) == 1:
        return verdicts[0]
    counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    return "mixed: " + ", ".join(f"{n}/{len(verdicts)} {v}" for v, n in counts.items())


def spread(long: pl.DataFrame) -> pl.DataFrame:
    """Mean, min and max of every number over the replicates that have it."""
    return (
        long.drop_nulls("value")
        .group_by("finding", "metric", maintain_order=True)
        .agg(n=pl.len(), mean=pl.col("value").mean(), min=pl.col("value").min(), max=pl.col("value").max())
    )


def _fmt(metric: str, x: float) -> str:
    if metric.endswith("_step") or metric.startswith(("healed", "n_")):
        return f"{x:.0f}"
    if metric.endswith(("_deg", "_ratio")) or metric.startswith(("rho", "sigma", "energy", "noise_", "ce_")):
        return f"{x:.3f}"
    return f"{100 * x:+.1f} pp" if metric.startswith(("gain", "ood_drop", "id_rise", "minus_")) else f"{100 * x:.1f} %"


def markdown(long: pl.DataFrame, names: list[str]) -> str:
    head = "| finding | " + " | ".join(names) + " | over the replicates |\n|---|" + "---|" * (len(names) + 1)
    rows = []
    for key, finding in report.FINDINGS.items():
        per = long.filter(pl.col("finding") == key).unique(["study"], keep="first", maintain_order=True)
        verdict = dict(zip(per["study"], per["verdict"]))
        rows.append(f"| {finding} | " + " | ".join(verdict.get(n, "no data") for n in names) + f" | **{overall([verdict.get(n, 'no data') for n in names])}** |")
    numbers = spread(long)
    wide = long.drop_nulls("value").pivot(on="study", index=["finding", "metric"], values="value")
    lines = ["| finding | number | " + " | ".join(names) + " | mean [min, max] |", "|---|---|" + "---|" * (len(names) + 1)]
    for r in numbers.join(wide, on=["finding", "metric"]).iter_rows(named=True):
        cells = " | ".join("" if r.get(n) is None else _fmt(r["metric"], r[n]) for n in names)
        lines.append(f"| {r['finding']} | {r['metric']} | {cells} | {_fmt(r['metric'], r['mean'])} [{_fmt(r['metric'], r['min'])}, {_fmt(r['metric'], r['max'])}] |")
    evidence = ["", "## Evidence per study", ""]
    for n in names:
        evidence += [f"### {n}", ""] + [f"- **{k}** ({v}): {e}" for k, v, e in long.filter(pl.col("study") == n).unique(["finding"], keep="first", maintain_order=True).select("finding", "verdict", "evidence").iter_rows()] + [""]
    return "\n".join(["# Replicates: " + ", ".join(names), "", "## Verdicts", "", head, *rows, "", "## Numbers", "", *lines, *evidence])


def hands(views: dict[str, tuple[pl.DataFrame | None, pl.DataFrame | None]]) -> str:
    """How many hands each evaluation played, read from the replicates' tables."""
    ns = sorted({int(n) for acc, _ in views.values() if acc is not None for n in acc["n"].unique()})
    if not ns:
        return "no evaluations"
    return f"{ns[0]} hands per split each" if len(ns) == 1 else f"{ns[0]}-{ns[-1]} hands per split"


def study_task(tables: Path) -> str:
    """The task a study ran (its claim, `studies/<name>/config.json`); claims written before
    the `task` field existed are GeneralPoints studies, the only task there was."""
    claim = Path(tables).parent / "config.json"
    return json.loads(claim.read_text()).get("task", "generalpoints") if claim.is_file() else "generalpoints"


def figure(views: dict[str, tuple[pl.DataFrame | None, pl.DataFrame | None]], out: Path, bench: Benchmark) -> Path | None:
    """OOD (and ID) accuracy through SFT for every replicate (its `sft_accuracy` and
    `rl_recovery` views), RL's end point from each start, and the paper's curve on its own panel."""
    if all(acc is None for acc, _ in views.values()):
        return None
    fig, (ax, axp) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, (acc, rec)) in enumerate(views.items()):
        if acc is None:
            continue
        c = colors[i % len(colors)]
        ood, idd = acc.filter(pl.col("split") == "ood"), acc.filter(pl.col("split") == "id")
        ax.plot(ood["step"], 100 * ood["accuracy"], "o-", ms=3, color=c, label=f"{name}: OOD after SFT")
        ax.plot(idd["step"], 100 * idd["accuracy"], ":", color=c, alpha=0.6, label=f"{name}: ID after SFT")
        if rec is not None:
            ax.plot(rec["start_step"], 100 * rec["ood_after"], "s", ms=7, mfc="none", mew=1.5, color=c, label=f"{name}: OOD after RL from step")
    ax.set_xscale("symlog", linthresh=10)
    ax.set(xlabel="SFT step (log scale above 10)", ylabel="accuracy (%)", title=f"{len(views)} replicates ({hands(views)})")
    ax.legend(fontsize=6, ncol=2)
    if (ref := bench.paper_reference()) is not None:
        for stage, style in (("sft", "o-"), ("rl", "s--")):
            d = ref.curve.filter(pl.col("stage").is_in([stage, "base"] if stage == "sft" else [stage])).sort("sft_step")
            axp.errorbar(d["sft_step"], d["accuracy_pct"], yerr=ref.se_pp, fmt=style, capsize=2, label="OOD after SFT" if stage == "sft" else "OOD after RL from step")
        axp.set(xlabel="SFT step", ylabel="OOD accuracy (%)", title=f"PAPER ({ref.label})")
        axp.legend(fontsize=7)
    else:
        axp.set_axis_off()
    fig.tight_layout()
    path = out / "fig_replicates.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(tables: dict[str, Path], out: Path) -> Path:
    """Judge every study (name -> its tables folder) and write the comparison to `out`, swapped in whole."""
    if len(tables) < 2:
        raise ReplicateError("compare: give at least two distinct studies")
    studies = {name: study_tables(Path(d)) for name, d in tables.items()}
    tasks = {name: study_task(Path(d)) for name, d in tables.items()}
    if len(set(tasks.values())) > 1:
        raise ReplicateError("compare: the studies ran different tasks (" + ", ".join(f"{n}: {t}" for n, t in tasks.items()) + "); replicates share one task")
    bench = benchmark.get(next(iter(tasks.values())))
    names = list(studies)
    views = {n: (report.sft_accuracy(t, bench), report.rl_recovery(t, bench)) for n, t in studies.items()}

    def fill(tmp: Path) -> None:
        long = judge({n: report.all_verdicts(studies[n], *views[n], bench) for n in names})
        long.write_parquet(tmp / "replicates.parquet")
        md = markdown(long, names)
        if figure(views, tmp, bench) is not None:
            md += "\n![fig_replicates](fig_replicates.png)\n"
        (tmp / "replicates.md").write_text(md)

    replace_dir(Path(out), fill)
    return Path(out)
