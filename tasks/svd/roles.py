"""Checkpoint roles and the default comparisons (analysis.md §1.2, §3.7).

Roles are aliases resolved to project-wide `ckpt_id`s before any computation:
base (step 0), B (best OOD accuracy among SFT steps > 0, or `roles.b_step`), S (last SFT
step), R (final checkpoint of the RL run started from `roles.rl_start`, default S).
RL checkpoints are `checkpoints` rows with stage "rl", `parent` = the SFT ckpt_id the run
started from and `step` = the update number.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import polars as pl

from rlheal.config import RolesSection

log = logging.getLogger("rlheal.svd")

ROLES_SCHEMA = {
    "run_id": pl.String, "model_name": pl.String, "role": pl.String, "ckpt_id": pl.String, "stage": pl.String,
    "step": pl.Int32, "rl_start_step": pl.Int32, "selected_by": pl.String, "selection_split": pl.String,
    "selection_accuracy": pl.Float64, "selection_n_hands": pl.Int32, "selection_margin_hands": pl.Int32, "storage_dtype": pl.String,
}  # fmt: skip
SELECTION_SPLIT = "ood"


def _storage_dtype(path: str | None) -> str | None:
    from tasks.svd.matrices import storage_dtype

    try:
        return storage_dtype(path) if path else None
    except FileNotFoundError:
        return None


def select_b(eval_summary: pl.DataFrame, checkpoints: pl.DataFrame, b_step: int | None = None) -> dict:
    """§1.2: B = argmax OOD accuracy over SFT checkpoints with step > 0, ties -> smallest step;
    `b_step` overrides. Returns ckpt_id, step, selected_by and the selection record."""
    sft = checkpoints.filter((pl.col("stage") == "sft") & (pl.col("step") > 0)).select("ckpt_id", "step")
    if sft.is_empty():
        raise ValueError("roles: no SFT checkpoint with step > 0 in the checkpoints table, so B cannot be chosen")
    ood = eval_summary.filter(pl.col("split") == SELECTION_SPLIT).select("ckpt_id", "n", "k", "accuracy")
    if ood.select(pl.col("ckpt_id").is_duplicated().any()).item():
        raise ValueError("eval_summary: more than one OOD row for a checkpoint; pass the rows of one evaluation protocol")
    ranked = sft.join(ood, on="ckpt_id", how="left").sort(pl.col("accuracy").fill_null(-1.0), pl.col("step"), descending=[True, False])
    if b_step is not None:
        chosen = ranked.filter(pl.col("step") == b_step)
        if chosen.is_empty():
            raise ValueError(f"roles.b_step: {b_step} is not the step of an SFT checkpoint ({sorted(sft['step'].to_list())})")
        by = "config"
    else:
        if ranked["accuracy"].is_null().all():
            raise ValueError(f"eval_summary: no OOD accuracy for any SFT checkpoint ({sft['ckpt_id'].to_list()}); evaluate them first or set roles.b_step")
        chosen, by = ranked.head(1), "auto"
    b = chosen.row(0, named=True)
    others = ranked.filter((pl.col("ckpt_id") != b["ckpt_id"]) & pl.col("k").is_not_null())
    margin = b["k"] - others["k"].max() if b["k"] is not None and not others.is_empty() else None
    return {
        "ckpt_id": b["ckpt_id"], "step": b["step"], "selected_by": by, "selection_split": SELECTION_SPLIT,
        "selection_accuracy": b["accuracy"], "selection_n_hands": b["n"], "selection_margin_hands": margin,
    }  # fmt: skip


def select_roles(
    eval_summary: pl.DataFrame,
    checkpoints: pl.DataFrame,
    roles_cfg: RolesSection,
    run_id: str | None = None,
    model_name: str | None = None,
) -> pl.DataFrame:
    """The `checkpoint_roles` table (§1.2, §6): one row per role present (R only if an RL run
    from `rl_start` exists)."""
    ck = checkpoints.with_columns(pl.col("step").cast(pl.Int32))
    base = ck.filter(pl.col("step") == 0, pl.col("stage") != "rl")
    if base.height != 1:
        raise ValueError(f"checkpoints: need exactly one step-0 (base) checkpoint, found {base['ckpt_id'].to_list()}")
    sft = ck.filter(pl.col("stage") == "sft", pl.col("step") > 0).sort("step")
    b = select_b(eval_summary, ck, roles_cfg.b_step)
    s = sft.row(-1, named=True)
    rows = [
        {"role": "base", **_ckpt(base.row(0, named=True)), "selected_by": "auto"},
        {"role": "B", "stage": "sft", **b, "path": _path(ck, b["ckpt_id"])},
        {"role": "S", **_ckpt(s), "selected_by": "auto"},
    ]
    start_step = roles_cfg.rl_start if roles_cfg.rl_start is not None else s["step"]
    start = ck.filter(pl.col("step") == start_step, pl.col("stage") != "rl")
    rl = ck.filter(pl.col("stage") == "rl", pl.col("parent").is_in(start["ckpt_id"].to_list())) if "parent" in ck.columns else ck.clear()
    if rl.is_empty():
        log.info("roles: no RL checkpoint started from SFT step %d; R is absent", start_step)
    else:
        r = rl.sort("step").row(-1, named=True)
        rows.append({"role": "R", **_ckpt(r), "rl_start_step": start_step, "selected_by": "config" if roles_cfg.rl_start is not None else "auto"})
    for row in rows:
        row.update(run_id=run_id, model_name=model_name, storage_dtype=_storage_dtype(row.pop("path", None)))
    return pl.DataFrame(rows, schema=ROLES_SCHEMA)


def _ckpt(row: dict) -> dict:
    return {"ckpt_id": row["ckpt_id"], "stage": row["stage"], "step": row["step"], "path": row.get("path")}


def _path(ck: pl.DataFrame, ckpt_id: str) -> str | None:
    return ck.filter(pl.col("ckpt_id") == ckpt_id)["path"].first() if "path" in ck.columns else None


# ---------------------------------------------------------------------------- comparisons


@dataclass
class Plan:
    """What to measure: weight pairs (ref, tgt), noise-control pairs, deltas (from, to) and
    delta pairs (ΔW_SFT, ΔW_RL); trajectories name the pairs of `svd_vs_accuracy`."""

    weights: list[tuple[str, str]] = field(default_factory=list)
    noise: list[tuple[str, str]] = field(default_factory=list)
    deltas: list[tuple[str, str]] = field(default_factory=list)
    delta_pairs: list[tuple[tuple[str, str], tuple[str, str]]] = field(default_factory=list)
    trajectories: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    @property
    def checkpoints(self) -> list[str]:
        """Every checkpoint whose weights are decomposed, in first-use order."""
        ids = [c for pair in self.weights + self.noise + self.deltas for c in pair]
        return list(dict.fromkeys(ids))


def delta_id(frm: str, to: str) -> str:
    """§3.7: `<from>..<to>` means W_to - W_from."""
    return f"{frm}..{to}"


def plan_comparisons(roles: pl.DataFrame, checkpoints: pl.DataFrame, noise_control: bool = True) -> Plan:
    """§1.2 defaults: base->B, B->S, S->R, B->R; trajectories B->(each later SFT checkpoint) and
    base->(each SFT checkpoint); deltas ΔW_SFT = W_S - W_B and ΔW_RL = W_R - W_{rl_start}.
    The noise control (§3.8) runs on the role comparisons, not on every trajectory point."""
    role = {r["role"]: r for r in roles.to_dicts()}
    base, b, s, r = (role.get(x, {}).get("ckpt_id") for x in ("base", "B", "S", "R"))
    sft = checkpoints.filter(pl.col("stage") == "sft", pl.col("step") > 0).sort("step")
    core = [(base, b), (b, s)] + ([(s, r), (b, r)] if r else [])
    traj = {
        "base": [(base, c) for c in sft["ckpt_id"]],
        "B": [(b, c) for c in sft.filter(pl.col("step") > role["B"]["step"])["ckpt_id"]],
    }
    plan = Plan(weights=list(dict.fromkeys(core + traj["base"] + traj["B"])), trajectories=traj)
    plan.noise = list(dict.fromkeys(core)) if noise_control else []
    plan.deltas = [(b, s)]
    if r:
        start = checkpoints.filter(pl.col("ckpt_id") == r)["parent"].item()
        plan.deltas.append((start, r))
        plan.delta_pairs = [((b, s), (start, r))]
    return plan
