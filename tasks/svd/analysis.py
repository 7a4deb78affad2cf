"""The `svd` stage: roles -> comparisons -> cached SVDs -> measurements -> tables (analysis.md §1-§3, §6).

Tables (every one with `run_id` = the study name and `model_name`):
- `checkpoint_roles`, `svd_spectra`, `svd_pair_metrics`, `svd_principal_angles`: as in §6.
  `svd_pair_metrics.skip_reason` is a "; "-joined list of validity rules (metrics.py names
  the columns each leaves null). Noise-control rows have tgt_id `noise:<ref>..<tgt>`.
- `svd_vs_accuracy`: one row per SFT-trajectory point (reference base or B), target and
  k-spec: model-level means over matrices of the rotation and drift summaries beside the
  target's ID / OOD accuracy and CE.
- `svd_correlations`: a second table (not extra rows) with the Spearman correlation across
  the trajectory's checkpoints of each summary with ID and with OOD accuracy.

Store layout: `svd/<key>/` is either a cache artifact of one decomposed object (engine.py)
or a sealed analysis run holding the stage tables. A run's key covers the svd and roles config
and, as inputs, the id and content hash of every checkpoint it reads plus a hash of the
evaluation rows it uses, so changed eval results (another B) give a new run while every
SVD already computed is reused from the cache.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

import polars as pl
import torch
from prefect import task
from scipy import stats

from rlheal.caching import Stage, open_store
from rlheal.config import StudyConfig
from rlheal.faults import maybe_fail
from rlheal.runners import gpu_lease
from rlheal.store import Artifact, Store, stable_hash, write_parquet
from tasks.eval import describe
from tasks.svd.engine import CACHE, ColumnRequest, SvdCache, column_request, content_hash, noise_id
from tasks.svd.matrices import Matrix, check_same_matrices, select_matrices
from tasks.svd.metrics import METRIC_COLUMNS, Measured, delta_metrics, noise_target, weight_metrics
from tasks.svd.roles import SELECTION_SPLIT, Plan, delta_id, plan_comparisons, select_roles

STAGE = Stage(CACHE.name, version="1", tables=("checkpoint_roles", "svd_spectra", "svd_pair_metrics", "svd_principal_angles", "svd_vs_accuracy", "svd_correlations"))
log = logging.getLogger("rlheal.svd")

I32, F64, STR = pl.Int32, pl.Float64, pl.String
_MATRIX = {"param": STR, "layer": I32, "block": STR, "module": STR, "m": I32, "n": I32, "rank": I32}
SPECTRA_SCHEMA = {"run_id": STR, "model_name": STR, "object_kind": STR, "object_id": STR, **_MATRIX, "sv_index": I32, "sigma": F64}
PAIR_SCHEMA = {
    "run_id": STR, "model_name": STR, "comparison": STR, "ref_id": STR, "tgt_id": STR, **_MATRIX,
    "k": I32, "k_spec": STR, "skip_reason": STR, "compute_dtype": STR,
    **{c: (I32 if c.startswith("n_forced_zero") or c.endswith("numerical_rank") else F64) for c in METRIC_COLUMNS},
}  # fmt: skip
ANGLES_SCHEMA = {"run_id": STR, "model_name": STR, "comparison": STR, "ref_id": STR, "tgt_id": STR, "param": STR, "k": I32, "side": STR, "angle_index": I32, "theta_rad": F64}
# Model-level summaries (unweighted means over matrices, nulls skipped) set beside accuracy.
SUMMARIES = (
    "angle_u_mean_deg", "angle_v_mean_deg", "chordal_u", "chordal_v", "energy_stretch", "energy_rotation",
    "energy_outside", "align_u", "align_v", "sdrift_mean_abs_rel_topk", "sdrift_mean_abs_rel_all", "dw_rel_fro",
)  # fmt: skip
VS_ACCURACY_SCHEMA = {
    "run_id": STR, "model_name": STR, "reference": STR, "ref_id": STR, "tgt_id": STR, "tgt_step": I32, "k_spec": STR, "n_matrices": I32,
    **dict.fromkeys(SUMMARIES, F64), "accuracy_id": F64, "accuracy_ood": F64, "ce_id": F64, "ce_ood": F64,
}  # fmt: skip
CORRELATIONS_SCHEMA = {
    "run_id": STR, "model_name": STR, "reference": STR, "k_spec": STR, "metric": STR, "accuracy_split": STR,
    "n_checkpoints": I32, "spearman_rho": F64, "p_value": F64,
}  # fmt: skip


def run_meta(cfg: StudyConfig) -> dict[str, str]:
    """`run_id` (the study) and `model_name` columns of every table (§6)."""
    return {"run_id": cfg.name, "model_name": cfg.model.name_or_path or f"builtin:{cfg.model.builtin}"}


# ---------------------------------------------------------------------------- measuring


class _LastUse:
    """Values loaded on first use and dropped after their last use: a matrix's weights stay in
    memory only while a comparison still needs them."""

    def __init__(self, load: Callable[[Hashable], object], uses: list[Hashable]):
        self.load, self.left, self.values = load, Counter(uses), {}

    def get(self, key: Hashable):
        if key not in self.values:
            self.values[key] = self.load(key)
        return self.values[key]

    def release(self, *keys: Hashable) -> None:
        for key in keys:
            self.left[key] -= 1
            if self.left[key] <= 0:
                self.values.pop(key, None)


def _rows(comparison: str, ref: str, tgt: str, mat: Matrix, measured: list[Measured], dtype: str, metrics: list, angles: list) -> None:
    ids = {"comparison": comparison, "ref_id": ref, "tgt_id": tgt, "param": mat.param}
    where = {"layer": mat.layer, "block": mat.block, "module": mat.module, "m": mat.m, "n": mat.n, "rank": mat.r}
    for res in measured:
        metrics.append(ids | where | {"k": res.k, "k_spec": res.k_spec, "skip_reason": res.skip_reason, "compute_dtype": dtype} | res.columns)
        for side, theta in (("U", res.theta_u), ("V", res.theta_v)):
            if theta is not None:
                angles.append(ids | {"k": res.k, "side": side, "theta_rad": theta.cpu().tolist()})


def measure_matrix(mat: Matrix, plan: Plan, cache: SvdCache, rows: dict[str, dict], objects: dict, k_specs: list) -> tuple[list, list, list]:
    """Every comparison of the plan on one matrix: (spectra, pair metric, angle) rows."""
    dtype = str(cache.dtype).removeprefix("torch.")
    sigma: dict = {}

    def factors(key):
        f = objects[key].factors(mat)
        sigma[key] = f.S
        return f

    W = _LastUse(lambda c: cache.weight(rows[c], mat), [c for pair in plan.weights + plan.noise + plan.deltas for c in pair])
    F = _LastUse(factors, [c for pair in plan.weights + plan.noise for c in pair] + [d for pair in plan.delta_pairs for d in pair])
    metrics: list[dict] = []
    angles: list[dict] = []
    for a, b in plan.weights:
        _rows("weights", a, b, mat, weight_metrics(W.get(a), W.get(b), F.get(a), F.get(b), k_specs), dtype, metrics, angles)
        W.release(a, b)
        F.release(a, b)
    for a, b in plan.noise:
        Wa = W.get(a)
        noisy = noise_target(Wa, float(torch.linalg.matrix_norm(W.get(b) - Wa)), mat.param)
        _rows("noise_control", a, noise_id(a, b), mat, weight_metrics(Wa, noisy, F.get(a), objects[("noise", a, b)].factors(mat), k_specs), dtype, metrics, angles)
        W.release(a, b)
        F.release(a, b)
    D = {}
    for d in plan.deltas:
        D[d] = W.get(d[1]) - W.get(d[0])
        W.release(*d)
    for d1, d2 in plan.delta_pairs:
        _rows("deltas", delta_id(*d1), delta_id(*d2), mat, delta_metrics(D[d1], D[d2], F.get(d1), F.get(d2), k_specs), dtype, metrics, angles)
        F.release(d1, d2)

    def spectrum(key) -> list[float]:
        return (sigma[key] if key in sigma else objects[key].factors(mat).S).cpu().tolist()

    spectra = [("weight", c, mat, spectrum(c)) for c in plan.checkpoints] + [("delta", delta_id(*d), mat, spectrum(d)) for d in plan.deltas]
    return spectra, metrics, angles


def checkpoint_columns(cfg: StudyConfig, roles: pl.DataFrame, plan: Plan, edit_columns: Mapping[str, ColumnRequest] | None) -> dict[str, ColumnRequest]:
    """ckpt_id -> the columns `analyse` decomposes it with, for every checkpoint of the plan."""
    measured = column_request(cfg)
    wider = checkpoint_requests(measured, roles, edit_columns)
    return {c: wider.get(c, measured) for c in plan.checkpoints}


def checkpoint_requests(measured: ColumnRequest, roles: pl.DataFrame, edit_columns: Mapping[str, ColumnRequest] | None) -> dict[str, ColumnRequest]:
    """ckpt_id -> its request where it is more than `measured`: a checkpoint that editing reads
    (role -> request in `edit_columns`) gets that on top; one with two roles gets both."""
    ids = dict(roles.select("role", "ckpt_id").rows())
    out: dict[str, ColumnRequest] = {}
    for role, req in (edit_columns or {}).items():
        if role in ids:
            out[ids[role]] = out.get(ids[role], measured) | req
    return out


def analyse(
    store: Store,
    cfg: StudyConfig,
    checkpoints: pl.DataFrame,
    eval_summary: pl.DataFrame,
    edit_columns: Mapping[str, ColumnRequest] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batched: bool | None = None,
) -> dict[str, pl.DataFrame]:
    """All tables of the stage, in memory. SVDs come from (or go to) the cache: every object
    with the measurement grid's columns, and the checkpoints of the roles in `edit_columns`
    (role -> request: editing's donors and targets) with that request too, in the same pass."""
    meta = run_meta(cfg)
    roles = select_roles(eval_summary, checkpoints, cfg.roles, **meta)
    plan = plan_comparisons(roles, checkpoints, cfg.svd.noise_control)
    rows = {r["ckpt_id"]: r for r in checkpoints.to_dicts()}
    matrices = select_matrices(rows[plan.checkpoints[0]]["path"], cfg.svd)
    for c in plan.checkpoints:
        check_same_matrices(rows[c]["path"], matrices)
    columns = checkpoint_columns(cfg, roles, plan, edit_columns)
    cache = SvdCache(store, matrices, column_request(cfg), device, dtype, batched, cfg.svd.batch_memory_gib)
    # Decompose first (one streaming pass per object; the flow has had most checkpoints
    # decomposed already, see `Decompositions`), then measure matrix by matrix.
    objects: dict = {c: cache.weights(rows[c], columns[c]) for c in plan.checkpoints}
    objects |= {d: cache.delta(rows[d[0]], rows[d[1]]) for d in plan.deltas}
    objects |= {("noise", a, b): cache.noise(rows[a], rows[b]) for a, b in plan.noise}
    spectra, metrics, angles = [], [], []
    for mat in matrices:
        s, m, a = measure_matrix(mat, plan, cache, rows, objects, list(cfg.svd.k))
        spectra += s
        metrics += m
        angles += a
    pair = pl.DataFrame([meta | r for r in metrics], schema=PAIR_SCHEMA)
    return {
        "checkpoint_roles": roles,
        "svd_spectra": spectra_table(spectra, meta),
        "svd_pair_metrics": pair,
        "svd_principal_angles": angles_table(angles, meta),
        **accuracy_tables(pair, plan, checkpoints, eval_summary, meta),
    }


# ---------------------------------------------------------------------------- streaming


class Decompositions:
    """The plan's checkpoint decompositions while the study runs (issue 18). B is chosen from
    the SFT checkpoints' OOD evaluations (§1.2); once they are all in, the plan's checkpoints
    (the base, every SFT checkpoint) are known with the columns `analyse` will ask of each, so
    the flow has each decomposed then, beside RL, and `analyse` finds them in the cache: still
    one SVD per (checkpoint, matrix) (§4.5 rule 1). R joins when the RL run it comes from
    has ended. Deltas and noise controls stay in `analyse` (they are cheap next to the
    checkpoints on a trajectory, and they need the roles)."""

    def __init__(self, store: Store, cfg: StudyConfig, edit_columns: Mapping[str, ColumnRequest] | None):
        self.store, self.cfg, self.edit_columns = store, cfg, edit_columns
        self.rows: dict[str, dict] = {}
        self.summaries: list[pl.DataFrame] = []
        self.given: set[str] = set()
        self.changed = False  # something seen since `new` last looked
        self.sft_steps = {k for k in cfg.sft.save_steps if k > 0}
        self._cache: SvdCache | None = None

    def seen(self, ckpt: dict) -> None:
        """A sealed checkpoint (its `checkpoints` row)."""
        self.rows[ckpt["ckpt_id"]] = ckpt
        self.changed = True

    def evaluated(self, eval_dir: str) -> None:
        """An evaluation artifact that has ended."""
        self.summaries.append(pl.read_parquet(Path(eval_dir) / "eval_summary.parquet"))
        self.changed = True

    def new(self) -> list[tuple[str, dict, ColumnRequest, Artifact]]:
        """(label, checkpoint row, columns, cache artifact) of the plan's checkpoints not handed out
        before; none until every SFT checkpoint's OOD accuracy is known."""
        if not self.changed or not self.summaries:
            return []
        self.changed = False
        summary = pl.concat(self.summaries, how="diagonal_relaxed")
        evaluated = set(summary.filter(pl.col("split") == SELECTION_SPLIT)["ckpt_id"])
        sft = {c: r for c, r in self.rows.items() if r["stage"] == "sft"}
        if {r["step"] for c, r in sft.items() if c in evaluated} != self.sft_steps:
            return []
        checkpoints = pl.from_dicts(list(self.rows.values()), infer_schema_length=None)
        roles = select_roles(summary, checkpoints, self.cfg.roles)
        plan = plan_comparisons(roles, checkpoints, self.cfg.svd.noise_control)
        columns = checkpoint_columns(self.cfg, roles, plan, self.edit_columns)
        out = []
        for c in plan.checkpoints:
            if c not in self.given:
                self.given.add(c)
                row = self.rows[c]
                out.append((f"svd {describe(row)}", row, columns[c], self.cache().weights_artifact(row, columns[c])))
        return out

    def cache(self) -> SvdCache:
        if self._cache is None:  # the matrices as `analyse` selects them: from the base
            base = next(r for r in self.rows.values() if r["stage"] == "base")
            self._cache = SvdCache(self.store, select_matrices(base["path"], self.cfg.svd), column_request(self.cfg), memory_gib=self.cfg.svd.batch_memory_gib)
        return self._cache


@task(name=STAGE.name, task_run_name="{name}")
def decompose_stage(artifact: Artifact, cfg: StudyConfig, ckpt: dict, columns: ColumnRequest, name: str) -> str:
    """One checkpoint's decomposition into the svd cache with the columns `analyse` will ask
    of it (`artifact`: where `Decompositions` found it would go)."""
    maybe_fail("svd")
    store = open_store(artifact.root)
    with gpu_lease(cfg.runner):
        cache = SvdCache(store, select_matrices(ckpt["path"], cfg.svd), column_request(cfg), memory_gib=cfg.svd.batch_memory_gib)
        return str(cache.weights(ckpt, columns).path)


# ---------------------------------------------------------------------------- tables


def spectra_table(spectra: list[tuple], meta: dict) -> pl.DataFrame:
    rows = [
        meta | {"object_kind": kind, "object_id": oid, "param": mat.param, "layer": mat.layer, "block": mat.block, "module": mat.module, "m": mat.m, "n": mat.n, "rank": mat.r, "sigma": sigma}
        for kind, oid, mat, sigma in spectra
    ]
    schema = {k: v for k, v in SPECTRA_SCHEMA.items() if k != "sv_index"} | {"sigma": pl.List(F64)}
    df = pl.DataFrame(rows, schema=schema).with_columns(sv_index=pl.int_ranges(pl.col("sigma").list.len(), dtype=I32))
    return df.explode("sigma", "sv_index").select(list(SPECTRA_SCHEMA))


def angles_table(angles: list[dict], meta: dict) -> pl.DataFrame:
    schema = {k: v for k, v in ANGLES_SCHEMA.items() if k != "angle_index"} | {"theta_rad": pl.List(F64)}
    df = pl.DataFrame([meta | a for a in angles], schema=schema).with_columns(angle_index=pl.int_ranges(pl.col("theta_rad").list.len(), dtype=I32))
    return df.explode("theta_rad", "angle_index").select(list(ANGLES_SCHEMA))


def _accuracy_by_ckpt(eval_summary: pl.DataFrame) -> pl.DataFrame:
    """One row per checkpoint: accuracy_id, accuracy_ood, ce_id, ce_ood (null if absent)."""
    es = eval_summary if "ce" in eval_summary.columns else eval_summary.with_columns(ce=pl.lit(None, F64))
    wide = es.select("ckpt_id", "split", "accuracy", pl.col("ce").cast(F64)).pivot(on="split", index="ckpt_id", values=["accuracy", "ce"], aggregate_function="first")
    for name in ("accuracy_id", "accuracy_ood", "ce_id", "ce_ood"):
        if name not in wide.columns:
            wide = wide.with_columns(pl.lit(None, F64).alias(name))
    return wide.select(pl.col("ckpt_id").alias("tgt_id"), "accuracy_id", "accuracy_ood", "ce_id", "ce_ood")


def accuracy_tables(pair: pl.DataFrame, plan: Plan, checkpoints: pl.DataFrame, eval_summary: pl.DataFrame, meta: dict) -> dict[str, pl.DataFrame]:
    """`svd_vs_accuracy`: per SFT-trajectory point (reference base or B) and k-spec, the
    model-level means of the rotation and drift summaries beside the target's ID/OOD accuracy
    and CE. `svd_correlations`: Spearman correlation across those checkpoints of each summary
    with each split's accuracy (null with fewer than 3 points or a constant column)."""
    traj = pl.DataFrame(
        [{"reference": ref, "ref_id": a, "tgt_id": b} for ref, pairs in plan.trajectories.items() for a, b in pairs],
        schema={"reference": STR, "ref_id": STR, "tgt_id": STR},
    )
    steps = checkpoints.select(pl.col("ckpt_id").alias("tgt_id"), pl.col("step").cast(I32).alias("tgt_step"))
    vs = (
        pair.filter(pl.col("comparison") == "weights")
        .join(traj, on=["ref_id", "tgt_id"])
        .group_by("reference", "ref_id", "tgt_id", "k_spec")
        .agg(pl.col(SUMMARIES).mean(), n_matrices=pl.len().cast(I32))
        .join(steps, on="tgt_id", how="left")
        .join(_accuracy_by_ckpt(eval_summary), on="tgt_id", how="left")
        .with_columns(**{k: pl.lit(v, STR) for k, v in meta.items()})
        .select(list(VS_ACCURACY_SCHEMA))
        .cast(VS_ACCURACY_SCHEMA)
        .sort("reference", "k_spec", "tgt_step")
    )
    rows = []
    long = vs.unpivot(index=["reference", "k_spec", "tgt_step", "accuracy_id", "accuracy_ood"], on=list(SUMMARIES), variable_name="metric")
    for (ref, k_spec, metric), group in long.group_by("reference", "k_spec", "metric", maintain_order=True):
        for split in ("id", "ood"):
            g = group.drop_nulls(["value", f"accuracy_{split}"])
            rho = p = None
            if g.height >= 3 and g["value"].n_unique() > 1 and g[f"accuracy_{split}"].n_unique() > 1:
                res = stats.spearmanr(g["value"].to_numpy(), g[f"accuracy_{split}"].to_numpy())
                rho, p = float(res.statistic), float(res.pvalue)
            rows.append(meta | {"reference": ref, "k_spec": k_spec, "metric": metric, "accuracy_split": split, "n_checkpoints": g.height, "spearman_rho": rho, "p_value": p})
    return {"svd_vs_accuracy": vs, "svd_correlations": pl.DataFrame(rows, schema=CORRELATIONS_SCHEMA)}


# ---------------------------------------------------------------------------- store and Prefect


def key_config(cfg: StudyConfig) -> dict:
    return {"svd": cfg.svd.model_dump(), "roles": cfg.roles.model_dump(), **run_meta(cfg)}


def artifact_inputs(cfg: StudyConfig, checkpoints: pl.DataFrame, eval_summary: pl.DataFrame) -> list[str]:
    """What a run reads: `ckpt:<id>:<content hash>` of every analysed checkpoint and
    `eval:<hash>` of the evaluation rows whose values reach the tables (roles, accuracies)."""
    roles = select_roles(eval_summary, checkpoints, cfg.roles)
    plan = plan_comparisons(roles, checkpoints, cfg.svd.noise_control)
    rows = {r["ckpt_id"]: r for r in checkpoints.to_dicts()}
    missing = [c for c in plan.checkpoints if c not in rows]
    if missing:
        raise ValueError(f"checkpoints: no row for {missing}")
    cols = [c for c in ("ckpt_id", "split", "n", "k", "accuracy", "ce") if c in eval_summary.columns]
    used = eval_summary.filter(pl.col("ckpt_id").is_in(plan.checkpoints)).select(cols).sort("ckpt_id", "split")
    return [f"ckpt:{c}:{content_hash(rows[c])}" for c in plan.checkpoints] + [f"eval:{stable_hash(used.to_dicts())}"]


def artifact(store: Store, cfg: StudyConfig, checkpoints: pl.DataFrame | list[str], eval_summary: pl.DataFrame | str) -> Artifact:
    """The analysis's address, from the content of what it reads (`artifact_inputs`): the
    tables as frames, or the Parquet files that hold them."""
    checkpoints = checkpoints if isinstance(checkpoints, pl.DataFrame) else read_checkpoints(checkpoints)
    eval_summary = eval_summary if isinstance(eval_summary, pl.DataFrame) else pl.read_parquet(eval_summary)
    return STAGE.artifact(store, key_config(cfg), inputs=artifact_inputs(cfg, checkpoints, eval_summary))


def run(
    store: Store,
    cfg: StudyConfig,
    checkpoints: pl.DataFrame,
    eval_summary: pl.DataFrame,
    edit_columns: Mapping[str, ColumnRequest] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    batched: bool | None = None,
    art: Artifact | None = None,
) -> Path:
    """Analyse the study's checkpoints, or find the sealed result (`art`, the task's artifact,
    else derived here). `edit_columns` (role -> request, `tasks.edit.column_requests`)
    lets the edit stage have the singular vectors of its donors and targets cached in
    the same single pass."""
    art = art or artifact(store, cfg, checkpoints, eval_summary)

    def build(tmp: Path) -> dict:
        tables = analyse(store, cfg, checkpoints, eval_summary, edit_columns, device, dtype, batched)
        for name in STAGE.tables:
            write_parquet(tables[name], tmp / f"{name}.parquet")
        roles = tables["checkpoint_roles"].select("role", "ckpt_id").rows()
        log.info("svd: roles %s; %d pair-metric rows", dict(roles), tables["svd_pair_metrics"].height)
        return {"rows": {n: t.height for n, t in tables.items()}, "roles": dict(roles)}

    return STAGE.build(art, build)


def read_checkpoints(paths: str | list[str]) -> pl.DataFrame:
    """One `checkpoints` table from one or more Parquet files (SFT's, RL's, ...)."""
    paths = [paths] if isinstance(paths, str) else paths
    return pl.concat([pl.read_parquet(p) for p in paths], how="diagonal_relaxed")


@task(name=STAGE.name, task_run_name="svd")
def stage(artifact: Artifact, cfg: StudyConfig, checkpoints: list[str], eval_summary: str, edit_columns: dict[str, ColumnRequest] | None = None) -> str:
    """The analysis of the checkpoints tables and eval summary (Parquet paths). `edit_columns`:
    what the editing sweep will read from its donors and targets, decomposed in this same
    pass so that no matrix is decomposed twice (§4.5 rule 1)."""
    maybe_fail("svd")
    store = open_store(artifact.root)
    with gpu_lease(cfg.runner):
        return str(run(store, cfg, read_checkpoints(checkpoints), pl.read_parquet(eval_summary), edit_columns=edit_columns, art=artifact))
