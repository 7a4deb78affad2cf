"""The verdicts on the paper's four findings, and their comparison across replicates, as
plain functions on small tables."""

import polars as pl

from tasks import report
from tasks.replicates import overall, spread


def acc_table(ood: dict[int, tuple[float, float, float]], idd: dict[int, float]) -> pl.DataFrame:
    rows = [{"split": "ood", "step": s, "accuracy": a, "accuracy_ci_low": lo, "accuracy_ci_high": hi, "k": round(500 * a), "n": 500} for s, (a, lo, hi) in ood.items()]
    rows += [{"split": "id", "step": s, "accuracy": a, "accuracy_ci_low": a - 0.04, "accuracy_ci_high": a + 0.04, "k": round(500 * a), "n": 500} for s, a in idd.items()]
    return pl.DataFrame(rows)


def test_forgetting_needs_a_peak_significantly_above_the_end():
    idd = {0: 0.0, 30: 0.6, 320: 0.8}
    clear = report.verdict_forgetting(acc_table({0: (0.0, 0.0, 0.01), 30: (0.19, 0.16, 0.22), 320: (0.05, 0.03, 0.07)}, idd), None)
    assert clear.verdict == "supported" and clear.values["peak_step"] == 30
    assert abs(clear.values["ood_drop"] - 0.14) < 1e-12
    overlap = report.verdict_forgetting(acc_table({0: (0.0, 0.0, 0.01), 30: (0.10, 0.07, 0.13), 320: (0.08, 0.06, 0.11)}, idd), None)
    assert overlap.verdict == "inconclusive"
    id_falls = report.verdict_forgetting(acc_table({0: (0.0, 0.0, 0.01), 30: (0.19, 0.16, 0.22), 320: (0.05, 0.03, 0.07)}, {0: 0.0, 30: 0.8, 320: 0.6}), None)
    assert id_falls.verdict == "not supported"


def editing_tables(first_quarter_edits: int):
    variants = pl.DataFrame([
        {"variant_id": "top", "method": "swap_directions", "reference_compat": False, "k_tail_spec": "0", "experiment": "E2", "k_top_spec": "0.2", "layers_spec": None, "n_matrices_edited": 14},
        {"variant_id": "quarter", "method": "swap_directions", "reference_compat": False, "k_tail_spec": "0", "experiment": "E3", "k_top_spec": "1.0", "layers_spec": "0-0.25", "n_matrices_edited": first_quarter_edits},
    ])  # fmt: skip
    res = pl.DataFrame([
        {"variant_id": "top", "split": "OOD", "recovery_fraction": 0.75, "recovery_ci_low": 0.6, "recovery_ci_high": 0.9},
        {"variant_id": "quarter", "split": "OOD", "recovery_fraction": 0.0, "recovery_ci_low": 0.0, "recovery_ci_high": 0.0},
    ])  # fmt: skip
    return res, variants


def test_an_edit_that_touches_no_matrix_is_no_evidence():
    v = report.verdict_editing(*editing_tables(first_quarter_edits=0))
    assert v.verdict == "supported" and "layers 0-0.25: edits no matrix of this model" in v.evidence
    assert v.values == {"rho top 0.2": 0.75}
    both = report.verdict_editing(*editing_tables(first_quarter_edits=3))
    assert both.verdict == "inconclusive"  # one claim supported, the other's interval sits at 0


def test_replicate_verdicts_and_spread():
    assert overall(["supported"] * 3) == "supported"
    assert overall(["supported", "inconclusive", "supported"]) == "mixed: 2/3 supported, 1/3 inconclusive"
    long = pl.DataFrame({"study": ["a", "b", "c"], "finding": ["window"] * 3, "verdict": ["x"] * 3, "metric": ["gain_from_80"] * 3, "value": [0.02, None, 0.06], "evidence": [""] * 3})
    row = spread(long).row(0, named=True)
    assert (row["n"], row["min"], row["max"]) == (2, 0.02, 0.06) and abs(row["mean"] - 0.04) < 1e-12


def test_number_field_reads_the_first_attempt_against_the_hand():
    block = '{{\n  "cards": [\'5\', \'Q\', \'Q\', \'4\'],\n  "number": [{}],\n  "formula": "4*(5+12/12)=24",\n}}'
    t = {
        "eval_ood": pl.DataFrame({"split": ["ood", "ood"], "index": [0, 1], "numbers": [[5, 12, 12, 4], [5, 12, 12, 4]]}),
        "eval_attempts": pl.DataFrame({
            "ckpt_id": ["s", "s", "s"], "split": ["ood"] * 3, "hand_index": [0, 1, 1], "attempt": [1, 1, 2],
            "response": [block.format("5, 12, 12, 4"), block.format("5, 10, 10, 4"), block.format("5, 12, 12, 4")],
        }),  # fmt: skip
    }
    nf = report.number_field(t)
    assert nf.to_dicts() == [{"ckpt_id": "s", "split": "ood", "number_field": 0.5}]  # hand 1's retry does not count
    t["eval_attempts"] = t["eval_attempts"].with_columns(response=pl.lit("no answer block"))
    assert report.number_field(t)["number_field"].to_list() == [0.0]
