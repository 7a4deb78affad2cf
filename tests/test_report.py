"""The report's views, figures and verdict header, and the comparison of replicates, as plain
functions on small tables (the verdict rules themselves: tests/test_verdicts.py)."""

import matplotlib.figure
import numpy as np
import polars as pl
import pytest

from flows import replicates
from flows.replicates import overall, spread
from tasks import report
from tests.conftest import GP


def edit_tables(first_quarter_edits: int, quarter_interval=(0.0, 0.0)):
    variants = pl.DataFrame([
        {"variant_id": "top", "method": "swap_directions", "reference_compat": False, "k_tail_spec": "0", "experiment": "E2", "k_top_spec": "0.2", "layers_spec": None, "n_matrices_edited": 14},
        {"variant_id": "quarter", "method": "swap_directions", "reference_compat": False, "k_tail_spec": "0", "experiment": "E3", "k_top_spec": "1.0", "layers_spec": "0-0.25", "n_matrices_edited": first_quarter_edits},
    ])  # fmt: skip
    res = pl.DataFrame([
        {"variant_id": "top", "split": "OOD", "accuracy": 0.15, "recovery_fraction": 0.75, "recovery_ci_low": 0.6, "recovery_ci_high": 0.9},
        {"variant_id": "quarter", "split": "OOD", "accuracy": 0.1, "recovery_fraction": sum(quarter_interval) / 2, "recovery_ci_low": quarter_interval[0], "recovery_ci_high": quarter_interval[1]},
    ])  # fmt: skip
    return res, variants


def test_an_edit_that_touches_no_matrix_is_no_evidence():
    v = report.verdict_edit(*edit_tables(first_quarter_edits=0))
    assert (v["edit_some"].verdict, v["edit_most"].verdict) == ("supported", "supported")
    assert "layers 0-0.25: edits no matrix of this model" in v["edit_some"].evidence
    assert v["edit_some"].values == {"rho top 0.2": 0.75, "rho_low top 0.2": 0.6, "rho_high top 0.2": 0.9}
    # the first quarter edits, and recovers nothing: the conjunction of the two claims fails
    both = report.verdict_edit(*edit_tables(first_quarter_edits=3))
    assert (both["edit_some"].verdict, both["edit_most"].verdict) == ("not supported", "not supported")
    mixed = report.verdict_edit(*edit_tables(first_quarter_edits=3, quarter_interval=(0.3, 0.6)))
    assert (mixed["edit_some"].verdict, mixed["edit_most"].verdict) == ("supported", "inconclusive")


def test_replicate_verdicts_and_spread():
    assert overall(["supported"] * 3) == "supported"
    assert overall(["supported", "inconclusive", "supported"]) == "mixed: 2/3 supported, 1/3 inconclusive"
    long = pl.DataFrame({"study": ["a", "b", "c"], "finding": ["window"] * 3, "verdict": ["x"] * 3, "metric": ["gain_from_80"] * 3, "value": [0.02, None, 0.06], "evidence": [""] * 3})
    row = spread(long).row(0, named=True)
    assert (row["n"], row["min"], row["max"]) == (2, 0.02, 0.06) and abs(row["mean"] - 0.04) < 1e-12


def test_number_field_reads_the_first_attempt_against_the_hand():
    block = '{{\n  "cards": [\'5\', \'Q\', \'Q\', \'4\'],\n  "number": [{}],\n  "formula": "4*(5+12/12)=24",\n}}'
    t = {
        "eval_set_ood": pl.DataFrame({"split": ["ood", "ood"], "index": [0, 1], "numbers": [[5, 12, 12, 4], [5, 12, 12, 4]]}),
        "eval_attempts": pl.DataFrame({
            "ckpt_id": ["s", "s", "s"], "split": ["ood"] * 3, "hand_index": [0, 1, 1], "attempt": [1, 1, 2],
            "response": [block.format("5, 12, 12, 4"), block.format("5, 10, 10, 4"), block.format("5, 12, 12, 4")],
        }),  # fmt: skip
    }
    nf = GP.report_columns(t)
    assert nf.to_dicts() == [{"ckpt_id": "s", "split": "ood", "number_field": 0.5}]  # hand 1's retry does not count
    t["eval_attempts"] = t["eval_attempts"].with_columns(response=pl.lit("no answer block"))
    assert GP.report_columns(t)["number_field"].to_list() == [0.0]


def edit_sweep() -> tuple[pl.DataFrame, pl.DataFrame]:
    """E2 (B→S) and E5 (S→R) both with method swap_directions, k_top given as absolute k (the
    authors' preset), which sort differently as strings ("1024" < "256" < "64")."""
    rows, res = [], []
    for exp, ks in (("E2", ["64", "1024", "256"]), ("E5", ["1024", "256"])):
        for k in ks:
            vid = f"{exp}-{k}"
            rows.append({"variant_id": vid, "experiment": exp, "method": "swap_directions", "k_top_spec": k, "k_tail_spec": "0", "layers_spec": None})
            for split in ("OOD", "ID"):
                res.append({"variant_id": vid, "split": split, "accuracy": int(k) / 2048 + (exp == "E5"), "recovery_fraction": int(k) / 1024})
    rows.append({"variant_id": "none-S", "experiment": "baseline", "method": "none", "k_top_spec": "0", "k_tail_spec": "0", "layers_spec": None})
    res += [{"variant_id": "none-S", "split": s, "accuracy": 0.1, "recovery_fraction": None} for s in ("OOD", "ID")]
    return pl.DataFrame(res), pl.DataFrame(rows)


def test_fig_editing_draws_each_experiment_on_its_own_line_in_numeric_k_order(tmp_path, monkeypatch):
    figs = []
    monkeypatch.setattr(report, "_save", lambda fig, out, name: figs.append(fig) or out / f"{name}.png")
    report.fig_edit(*edit_sweep(), tmp_path)
    for ax in figs[0].axes:
        lines = {ln.get_label(): [float(x) for x in ln.get_xdata()] for ln in ax.get_lines()}
        assert lines == {"E2 swap_directions": [64.0, 256.0, 1024.0], "E5 swap_directions": [256.0, 1024.0]}, lines
    ood = {ln.get_label(): list(ln.get_ydata()) for ln in figs[0].axes[0].get_lines()}
    assert ood["E5 swap_directions"] == [100 * (256 / 2048 + 1), 100 * (1024 / 2048 + 1)]  # E5's own points, not E2's


def test_replicates_figure_reads_the_hand_count_from_the_tables(tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, path, **kw: titles.append(self.axes[0].get_title()))
    acc = pl.DataFrame({"split": ["ood", "id", "ood", "id"], "step": [0, 0, 10, 10], "accuracy": [0.0, 0.0, 0.1, 0.2], "n": [234] * 4})
    replicates.figure({"a": (acc, None), "b": (acc, None)}, tmp_path, GP)
    assert titles == ["2 replicates (234 hands per split each)"]


def test_the_report_header_states_the_rules_it_applies(tmp_path):
    """report.md's verdict section prints the rules from the constants the rule functions use,
    and one verdict row per finding."""
    tables = tmp_path / "tables"
    tables.mkdir()
    res, variants = edit_tables(first_quarter_edits=3, quarter_interval=(-0.1, 0.9))
    res.write_parquet(tables / "edit_eval_results.parquet")
    variants.write_parquet(tables / "edit_variants.parquet")
    info = report.build(tables, tmp_path / "out", "rlheal study", GP)
    md = (tmp_path / "out" / "report.md").read_text()
    head = md.split("## Verdicts\n", 1)[1].split("\n## ", 1)[0]
    assert report.rules_markdown() in head
    assert f"drift < {100 * report.SIGMA_DRIFT_MAX:g} %" in head and f"≥ {report.ROTATION_MARGIN:g}" in head and f"≥ {report.RECOVERS_MOST:g}" in head
    rows = [r for r in head.splitlines() if r.startswith("| ") and r.endswith("** |")]
    assert [r.rsplit("**", 2)[1] for r in rows] == ["no data"] * 4 + ["inconclusive", "inconclusive", "no data"]
    assert [v["finding"] for v in info["verdicts"]] == list(report.FINDINGS.values())


def test_rl_recovery_gains_are_paired_per_hand():
    """The gain interval comes from per-hand differences on the same OOD hands; Wilson
    intervals of the two accuracies overlap here although every changed hand improved."""
    n = 200
    before, after = np.zeros(n), np.zeros(n)
    before[:40] = 1
    after[:52] = 1  # +12 hands, none lost: 20 % → 26 %
    att = pl.concat([
        pl.DataFrame({"ckpt_id": c, "split": "ood", "hand_index": np.arange(n), "attempt": 1, "reward": np.where(y > 0, 5.0, -1.0)})
        for c, y in (("sft-8", before), ("rl-8-5", after))
    ])  # fmt: skip
    k = {"sft-8": 40, "rl-8-5": 52}
    summary = pl.DataFrame([{"ckpt_id": c, "stage": s, "step": st, "split": "ood", "n": n, "k": k[c], "accuracy": k[c] / n, "accuracy_ci_low": float(report.wilson(np.array([k[c]]), n)[0][0]), "accuracy_ci_high": float(report.wilson(np.array([k[c]]), n)[1][0])} for c, s, st in (("sft-8", "sft", 8), ("rl-8-5", "rl", 5))])
    ck = pl.DataFrame({"ckpt_id": ["sft-8", "rl-8-5"], "stage": ["sft", "rl"], "step": [8, 5], "rl_start_step": [None, 8]}, schema_overrides={"rl_start_step": pl.Int32})
    rec = report.rl_recovery({"eval_attempts": att, "eval_summary": summary, "checkpoints": ck}, GP).row(0, named=True)
    assert rec["after_low"] < rec["before_high"]  # the unpaired intervals overlap
    assert rec["status"] == "healed" and rec["healed"] and rec["gain_low"] > 0.02


def test_the_loss_evidence_names_the_answer_its_ce_scores():
    """With `data.answer: first` the CE scores the first canonical solution, not the dealt
    reference (training.md §7.3): the verdict and the loss figure say which."""
    import numpy as np

    from tests.test_verdicts import HANDS, sft_study, verdicts

    steps = np.array([10, 20, 30, 40])
    ood = np.zeros((4, HANDS))
    for i, a in enumerate([0.10, 0.20, 0.08, 0.04]):
        ood[i, : int(a * HANDS)] = 1
    idd = np.tile((np.arange(HANDS) < 300).astype(float), (4, 1))
    ce_steps = np.arange(2, 41, 2)
    t = sft_study(ood, idd, steps, 1 - ce_steps / 100, ce_steps)
    assert "CE of the reference answer" in verdicts(t)["loss"].evidence  # tables from before the column
    t["sft_log"] = t["sft_log"].with_columns(ce_target=pl.lit("first"))
    assert "CE of the first answer" in verdicts(t)["loss"].evidence


def test_rl_starts_give_id_accuracy_reward_and_advantage_spread_per_start():
    rec = pl.DataFrame({"start_step": [8, 16], "before_id": ["sft-8", "sft-16"], "after_id": ["rl-8-10", "rl-16-10"]})
    acc = {"sft-8": 0.5, "rl-8-10": 0.7, "sft-16": 0.9, "rl-16-10": 0.8}
    summary = pl.DataFrame([{"ckpt_id": c, "split": sp, "accuracy": a if sp == "id" else 0.0, "accuracy_ci_low": a - 0.1, "accuracy_ci_high": a + 0.1} for c, a in acc.items() for sp in ("id", "ood")])
    bins = 4  # + 2 overflow bins = 6
    logs = []
    for step in (8, 16):
        for u in range(1, 11):
            # start 8: each update's histogram sits in one bin, a different one at odd and even
            # updates, so the run's summed histogram is spread over two bins (entropy log 2 / log 6)
            # although every single update's is not; start 16: one bin throughout
            hist = ([0, 1, 0, 0, 0, 0] if u % 2 else [0, 0, 0, 0, 1, 0]) if step == 8 else [0, 0, 4, 0, 0, 0]
            logs.append({"rl_start_step": step, "update": u, "reward_mean": float(u if step == 8 else -u), "adv_q05": -2.0, "adv_q25": -1.0, "adv_q75": float(u) if step == 8 else 3.0, "adv_q95": 3.0, "adv_hist": hist})
    logs.append({"rl_start_step": 16, "update": 11, "reward_mean": -11.0, "adv_q05": None, "adv_q25": None, "adv_q75": None, "adv_q95": None, "adv_hist": None})  # GRPO reusing a generation
    rows = report.rl_starts({"eval_summary": summary, "rl_log": pl.DataFrame(logs).sample(fraction=1.0, shuffle=True, seed=1)}, rec).to_dicts()
    assert [r["start_step"] for r in rows] == [8, 16]
    a, b = rows
    assert (a["id_before"], a["id_after"], b["id_before"], b["id_after"]) == (0.5, 0.7, 0.9, 0.8)  # ID, not OOD, joined by checkpoint
    assert a["id_after_ci_low"] == pytest.approx(0.6)
    assert (a["reward_first_fifth"], a["reward_last_fifth"]) == (1.5, 9.5)  # updates in order, though the log was shuffled
    assert (b["reward_first_fifth"], b["reward_last_fifth"]) == (-1.5, pytest.approx(-10.5))  # 11 updates: fifths of 2
    assert (a["adv_iqr"], b["adv_iqr"], a["adv_q05_q95"]) == (6.5, 4.0, 5.0)  # the mean over updates of q75 - q25 (u + 1)
    assert a["adv_entropy"] == pytest.approx(np.log(2) / np.log(6)) and b["adv_entropy"] == 0.0


def test_the_reports_inputs_name_every_source_file_by_path(tmp_path):
    """A report is kept when it was drawn from the same inputs; its code inputs are keyed by
    path, so moving a file (same bytes, other module) or changing one redraws it, and a
    shipped model's files (not code) do not count."""
    root, tables = tmp_path / "project", tmp_path / "tables"
    for rel, text in {"tasks/a.py": "A = 1\n", "rlheal/b.py": "B = 2\n", "tasks/paper.csv": "x\n1\n", "tasks/shipped/m/vocab.py": "big\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    tables.mkdir()
    pl.DataFrame({"x": [1]}).write_parquet(tables / "t.parquet")
    first = report.inputs(tables, "s", "generalpoints", root=root)
    assert set(first["code"]) == {"tasks/a.py", "rlheal/b.py", "tasks/paper.csv"}
    assert report.inputs(tables, "s", "generalpoints", root=root) == first
    (root / "tasks/a.py").rename(root / "tasks/c.py")
    moved = report.inputs(tables, "s", "generalpoints", root=root)
    assert moved != first and sorted(moved["code"].values()) == sorted(first["code"].values())
    (root / "rlheal/b.py").write_text("B = 3\n")
    assert report.inputs(tables, "s", "generalpoints", root=root)["code"] != moved["code"]
    pl.DataFrame({"x": [2]}).write_parquet(tables / "t.parquet")
    assert report.inputs(tables, "s", "generalpoints", root=root)["tables"] != moved["tables"]


def test_the_hidden_section_shows_small_values_names_b_equal_s_and_needs_rows(tmp_path):
    from tasks.drift.hidden import PAIR_SCHEMA, RECOVERY_SCHEMA

    def pair(x, y, xi, yi, metric, value):
        return {"run_id": "t", "model_name": "m", "split": "ood", "model_x": x, "model_y": y, "x_id": xi, "y_id": yi, "n_prompts": 8, "metric": metric, "value": value}

    ids = {"B": "sft-4", "S": "sft-8", "R": "rl-8-2"}
    rows = [pair("B", y, ids["B"], ids[y], "js", v) for y, v in (("S", 2.5e-5), ("R", 1.25e-5))] + [pair(m, m, ids[m], ids[m], "entropy", 0.5) for m in ids]
    rec = [{"run_id": "t", "model_name": "m", "split": "ood", "metric": "js", "n_prompts": 8, "delta": 1.25e-5, "delta_norm": 0.5, "win_rate": 0.75}]
    md = report.hidden_table(pl.DataFrame(rows, schema=PAIR_SCHEMA), pl.DataFrame(rec, schema=RECOVERY_SCHEMA))
    assert "B = sft-4, S = sft-8, R = rl-8-2; 8 prompts" in md and "2.5e-05" in md and "1.25e-05" in md and "B = S" not in md
    assert "| js |" in md and "entropy" not in md  # pair metrics only; a model's own values stay in the table
    same = [pair("B", y, "sft-8", "sft-8" if y == "S" else ids[y], "js", v) for y, v in (("S", 1e-10), ("R", 1e-3))]
    assert "B = S (the last SFT checkpoint is the OOD-best)" in report.hidden_table(pl.DataFrame(same, schema=PAIR_SCHEMA), pl.DataFrame(rec, schema=RECOVERY_SCHEMA))
    # no rows: the section says the tables are absent rather than print an empty table
    tables = tmp_path / "tables"
    tables.mkdir()
    pl.DataFrame([], schema=PAIR_SCHEMA).write_parquet(tables / "hidden_pair_metrics.parquet")
    pl.DataFrame([], schema=RECOVERY_SCHEMA).write_parquet(tables / "hidden_recovery.parquet")
    report.build(tables, tmp_path / "out", "t", GP)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Hidden states of B, S and R\n\n*Absent" in text
