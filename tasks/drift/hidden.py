"""The hidden-state analyses of analysis.md §5 for the roles B, S and R (issue 19): how far S
(the end of SFT) and R (the end of RL) sit from B (the OOD-best SFT checkpoint), read at the
answer anchor of the drift stage's prompts, and whether RL brought the model back towards B.

- `hidden_pair_metrics`: per split and pair (B, S), (B, R), every §5 metric: the cosine's mean
  and p10 / p50 / p90, linear CKA, unbiased RBF-MMD² with its permutation p-value, JS, the two
  KLs at the anchor, top-k Jaccard for k = 1 … 50; and per model (a row whose model_x and
  model_y are the same model) its mean entropy and logit margin.
- `hidden_recovery`: per split and pair metric, Δ = how much closer R is to B than S is
  (similarity: s(B,R) − s(B,S); distance: δ(B,S) − δ(B,R)), Δ over the (B, S) value, and the
  win-rate over prompts for the metrics measured per prompt (ties ½).

The three models are read on the same sequences as the drift stage (each prompt followed by
the base's own greedy answer, so no evaluation answer is read); the anchor's state depends on
the prompt alone. S and R are compared with B, not with each other (§5's recovery needs only
these two pairs).
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

from tasks.drift import signals, states

F64, I32, STR = pl.Float64, pl.Int32, pl.String
PAIR_SCHEMA = {"run_id": STR, "model_name": STR, "split": STR, "model_x": STR, "model_y": STR, "x_id": STR, "y_id": STR, "n_prompts": I32, "metric": STR, "value": F64}
RECOVERY_SCHEMA = {"run_id": STR, "model_name": STR, "split": STR, "metric": STR, "n_prompts": I32, "delta": F64, "delta_norm": F64, "win_rate": F64}
JACCARD_KS = tuple(range(1, 51))  # §5: k = 1 … 50
PERMUTATIONS = 200  # §5's optional permutation p-value of the MMD²
PAIRS = (("B", "S"), ("B", "R"))
PER_MODEL = ("entropy", "margin")  # a model's own, not a distance between two


def per_prompt(pair: states.Pair) -> dict:
    """The pair metrics measured per prompt (the win-rate compares them prompt by prompt)."""
    return {"cosine": pair.cosine, "js": pair.js, "kl_forward": pair.kl_forward, "kl_reverse": pair.kl_reverse, **{f"jaccard_top{k}": v for k, v in pair.jaccard.items()}}


def pair_metrics(pair: states.Pair, prompts: Mapping[str, object]) -> dict[str, float]:
    """Every §5 metric of a pair (`prompts`: its `per_prompt`), as the mean over the prompts
    or the sample-level value."""
    mmd2, p = signals.rbf_mmd2_permutation(pair.hidden_x, pair.hidden_y, PERMUTATIONS)
    out = {f"cosine_{k}": v for k, v in signals.quantiles(pair.cosine).items()}
    out |= {"cka": signals.linear_cka(pair.hidden_x, pair.hidden_y), "mmd2": mmd2, "mmd2_p_value": p}
    out |= {name: float(v.mean()) for name, v in prompts.items() if name != "cosine"}
    return out


def tables(read, roles: Mapping[str, str], answers: pl.DataFrame, run_id: str, model_name: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(`hidden_pair_metrics`, `hidden_recovery`). `read(ckpt_id, sequences, prompt lengths)`
    gives a model's `states.forward` batches (tasks.drift.Reader); `roles`: role (B, S, R) ->
    ckpt_id (R may be absent: no recovery); `answers`: `answer_rows`."""
    pairs = [(x, y) for x, y in PAIRS if x in roles and y in roles]
    ids = list(dict.fromkeys(roles[r] for x, y in pairs for r in (x, y)))
    rows, recovered = [], []
    for split in ("id", "ood"):
        seqs, n = states.sequences(answers, split)
        readers = {c: read(c, seqs, n) for c in ids}
        compared = states.compare(readers, [(roles[x], roles[y]) for x, y in pairs], JACCARD_KS)
        got = {(x, y): compared[roles[x], roles[y]] for x, y in pairs}

        def row(x: str, y: str, metric: str, value: float) -> dict:
            return {"run_id": run_id, "model_name": model_name, "split": split, "model_x": x, "model_y": y, "x_id": roles[x], "y_id": roles[y], "n_prompts": len(seqs), "metric": metric, "value": value}

        prompts = {xy: per_prompt(pair) for xy, pair in got.items()}
        metrics = {xy: pair_metrics(pair, prompts[xy]) for xy, pair in got.items()}
        for (x, y), values in metrics.items():
            rows += [row(x, y, m, v) for m, v in values.items()]
        own = {}  # each model's entropy and margin, once, from the first pair it is in
        for (x, y), pair in got.items():
            own.setdefault(x, {"entropy": pair.entropy_x, "margin": pair.margin_x})
            own.setdefault(y, {"entropy": pair.entropy_y, "margin": pair.margin_y})
        rows += [row(m, m, name, float(v.mean())) for m, values in own.items() for name, v in values.items()]
        if ("B", "R") in got:
            prompts_bs, prompts_br = prompts["B", "S"], prompts["B", "R"]
            for metric, value in metrics["B", "S"].items():
                if metric == "mmd2_p_value":  # a test's p-value, neither closeness nor distance
                    continue
                delta, norm = signals.recovery(metric, value, metrics["B", "R"][metric])
                if roles["B"] == roles["S"]:  # (B, S) is one model: its distances are 0 up to rounding
                    norm = None
                base_name = "cosine" if metric == "cosine_mean" else metric
                win = signals.win_rate(metric, prompts_bs[base_name], prompts_br[base_name]) if base_name in prompts_bs else None
                recovered.append({"run_id": run_id, "model_name": model_name, "split": split, "metric": metric, "n_prompts": len(seqs), "delta": delta, "delta_norm": norm, "win_rate": win})
    return pl.DataFrame(rows, schema=PAIR_SCHEMA), pl.DataFrame(recovered, schema=RECOVERY_SCHEMA)
