"""The `edit` stage: one cached task per variant, then the study tables (analysis.md §4, §6).

Per variant, `<store>/edit/<key>/` holds that variant's rows of
- `edit_variants` (one row), `edit_matrix_log` (one row per matrix in scope),
- `edit_eval_results` (ID and OOD; recovery columns still null: they need the baselines),
- `edit_eval_attempts` (eval_attempts rows with `variant_id`, split "ID" / "OOD": the per-hand
  outcomes of the paired bootstrap), and with `keep_checkpoints` (or reference_compat) the
  edited model as a full checkpoint in `checkpoint/`.
The key covers the variant, the donor and target content hashes, the matrix selection, the
evaluation protocol and hands, and the stage version. `collect` concatenates the variants and fills in
donor / target accuracy, the recovery fraction with its bootstrap CI and E5's damage fraction.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
from prefect import task

from rlheal.caching import Stage, open_store
from rlheal.config import StudyConfig
from rlheal.faults import maybe_fail
from rlheal.runners import gpu_lease
from rlheal.space import has_r
from rlheal.store import Artifact, Store, stable_hash, write_parquet
from tasks import benchmark, eval, lm
from tasks.edit.apply import applied, hf_config, model_dtype, n_layers, resident
from tasks.edit.grid import variants
from tasks.edit.recovery import damage_fraction, paired_bootstrap
from tasks.svd.analysis import read_checkpoints, run_meta
from tasks.benchmark import Benchmark, solved
from tasks.svd.engine import content_hash
from tasks.svd.matrices import EMBEDDING, LM_HEAD, tied_embeddings, tensor_index

# 2: compat quirk 4 also for mllama_text_model (Llama 3.2 Vision as the model stage saves it)
STAGE = Stage("edit", version="2", tables=("edit_variants", "edit_matrix_log", "edit_eval_results", "edit_eval_attempts"))
log = logging.getLogger("rlheal.edit")

I32, F64, STR, BOOL = pl.Int32, pl.Float64, pl.String, pl.Boolean
UTC = pl.Datetime("us", "UTC")
_RUN = {"run_id": STR, "model_name": STR}
VARIANTS_SCHEMA = {
    **_RUN, "variant_id": STR, "experiment": STR, "method": STR, "donor_id": STR, "target_id": STR, "k_top_spec": STR,
    "k_tail_spec": STR, "layers_spec": STR, "layers": pl.List(I32), "edit_embeddings": BOOL, "edit_lm_head": BOOL,
    "include_patterns": pl.List(STR), "reference_compat": BOOL, "n_matrices_selected": I32, "n_matrices_edited": I32,
    "n_full_reset": I32, "mean_rel_change_vs_target": F64, "model_dtype": STR, "saved": BOOL, "weights_sha256": STR,
    "config_hash": STR, "created_at": UTC,
}  # fmt: skip
MATRIX_LOG_SCHEMA = {
    **_RUN, "variant_id": STR, "param": STR, "layer": I32, "module": STR, "m": I32, "n": I32, "rank": I32,
    "k_top_eff": I32, "k_tail_eff": I32, "n_indices": I32, "full_reset": BOOL, "compat_early_exit": BOOL,
    "rel_change_vs_target": F64, "rel_dist_to_donor": F64,
}  # fmt: skip
RESULTS_SCHEMA = {
    **_RUN, "variant_id": STR, "task": STR, "split": STR, "eval_protocol_id": STR, "seed": pl.Int64, "n_hands": I32,
    "n_correct": I32, "accuracy": F64, "accuracy_ci_low": F64, "accuracy_ci_high": F64, "donor_accuracy": F64,
    "target_accuracy": F64, "recovery_fraction": F64, "recovery_ci_low": F64, "recovery_ci_high": F64,
    "gap_significant": BOOL, "damage_fraction": F64, "evaluated_at": UTC,
}  # fmt: skip
SCHEMAS = {"edit_variants": VARIANTS_SCHEMA, "edit_matrix_log": MATRIX_LOG_SCHEMA, "edit_eval_results": RESULTS_SCHEMA}


def schemas(bench: Benchmark) -> dict[str, dict]:
    """Every table's schema; edit_eval_attempts has the task's attempt columns."""
    return SCHEMAS | {"edit_eval_attempts": {**_RUN, "variant_id": STR, **eval.attempts_schema(bench)}}


def split_label(split: str) -> str:
    """An eval-stage split as the editing tables write it (§6): `id` -> `ID`."""
    return split.upper()

# Files of a checkpoint directory that are not its config / tokenizer / generation files.
_NOT_COPIED = {"manifest.json", "source.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "trainer_state.json"}


# ---------------------------------------------------------------------------- planning


def read_roles(path: str | Path) -> pl.DataFrame:
    """The `checkpoint_roles` table: its Parquet file or the svd artifact that holds it."""
    path = Path(path)
    return pl.read_parquet(path / "checkpoint_roles.parquet" if path.is_dir() else path)


def _rows(checkpoints: pl.DataFrame) -> dict[str, dict]:
    return {r["ckpt_id"]: r for r in checkpoints.to_dicts()}


def plan(cfg: StudyConfig, roles: pl.DataFrame, checkpoints: pl.DataFrame) -> list[dict]:
    """The resolved sweep (`grid.variants`), the layer count read from S's config."""
    if not cfg.edit.enabled:
        return []
    s = roles.filter(pl.col("role") == "S")["ckpt_id"].first()
    rows = _rows(checkpoints)
    if s not in rows:
        raise ValueError(f"checkpoint_roles: no S checkpoint{f' ({s}) in the checkpoints table' if s else ''}; the edit stage needs the svd stage's roles and every SFT / RL checkpoints table")
    return variants(cfg, roles, n_layers(rows[s]["path"]))


def sweep_size(cfg: StudyConfig, model_path: Path) -> dict:
    """The sweep's size before any checkpoint exists (`variants` on stand-in roles, the layer
    count of the starting model) and, for keep_checkpoints, the kind of checkpoint each target
    is: what `rlheal.space.estimate` needs of this stage."""
    n_sft = sum(1 for s in cfg.sft.save_steps if s > 0)
    ids = {"base": "base", "B": "sft-B" if n_sft > 1 else "sft-S", "S": "sft-S"} | ({"R": "rl-R"} if has_r(cfg) else {})
    roles = pl.DataFrame({"role": list(ids), "ckpt_id": list(ids.values())})
    sweep = variants(cfg, roles, n_layers(model_path)) if cfg.edit.enabled and n_sft else []
    kinds = {v["target_role"]: {"base": "base", "R": "rl"}.get(v["target_role"], "sft") for v in sweep if v["method"] != "none"}
    return {
        "edit_roles": kinds,
        "n_variants": sum(v["method"] != "none" for v in sweep),
        "n_baselines": sum(v["method"] == "none" for v in sweep),
    }


def _check_roles(variant: dict, roles: pl.DataFrame) -> None:
    ids = dict(roles.select("role", "ckpt_id").rows())
    for side in ("donor", "target"):
        role, ckpt = variant[f"{side}_role"], variant[f"{side}_id"]
        if role is not None and ids.get(role) != ckpt:
            raise ValueError(f"variant {variant['variant_id']} was planned with {role} = {ckpt}, but the roles table now says {role} = {ids.get(role)}: plan the sweep again")


# ---------------------------------------------------------------------------- store key


def _eval_set_hashes(data_path: Path, splits: tuple[str, ...]) -> dict[str, str]:
    return {s: pl.read_parquet(Path(data_path) / f"eval_set_{s}.parquet", columns=["eval_set_hash"])["eval_set_hash"][0] for s in splits}


def saves(cfg: StudyConfig, variant: dict) -> bool:
    """A full checkpoint per variant: with keep_checkpoints, and always under quirk 6."""
    return variant["method"] != "none" and (cfg.edit.keep_checkpoints or variant["reference_compat"])


def key_config(cfg: StudyConfig, variant: dict, target: dict, donor: dict | None, eval_set_hashes: dict[str, str]) -> dict:
    svd = cfg.svd.model_dump(include={"include", "exclude", "include_embeddings", "include_lm_head"})
    protocol = {"decoding": eval.decoding_key(cfg), "verifier": cfg.verifier.model_dump(), "ce_hands": cfg.eval.ce_hands, "date_string": cfg.chat.date_string}
    return {
        "task": cfg.task, "variant": variant, "target": content_hash(target), "donor": content_hash(donor) if donor else None, "matrices": svd,
        "eval": protocol | {"eval_set_hash": eval_set_hashes}, "save": saves(cfg, variant),
        "trust_remote_code": cfg.model.trust_remote_code, **run_meta(cfg),
    }  # fmt: skip


def _inputs(target: dict, donor: dict | None) -> list[str]:
    return [f"ckpt:{r['ckpt_id']}:{content_hash(r)}" for r in (target, donor) if r]


def artifact(store: Store, cfg: StudyConfig, variant: dict, checkpoints: pl.DataFrame, data_path: str | Path) -> Artifact:
    rows = _rows(checkpoints)
    target, donor = rows[variant["target_id"]], rows.get(variant["donor_id"])
    config = key_config(cfg, variant, target, donor, _eval_set_hashes(Path(data_path), benchmark.of(cfg).splits))
    return STAGE.artifact(store, config, inputs=_inputs(target, donor))


# ---------------------------------------------------------------------------- one variant


def save_checkpoint(loaded, target: dict, out: Path) -> str:
    """The edited model as a full checkpoint: safetensors, then the target's config, tokenizer and
    generation files (quirk 6). Returns the weights' sha256."""
    loaded.model.save_pretrained(out, safe_serialization=True)
    for f in Path(target["path"]).iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin", ".pt", ".pth") and f.name not in _NOT_COPIED and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    return lm.weights_hash(out)


def edit_and_evaluate(store: Store, cfg: StudyConfig, variant: dict, target: dict, donor: dict | None, hands: dict[str, pl.DataFrame], save_to: Path | None = None) -> dict[str, pl.DataFrame]:
    """Apply the variant to the (resident) target, optionally save it, evaluate both splits,
    restore. Returns the variant's rows of the four tables."""
    meta = run_meta(cfg)
    compat = variant["reference_compat"]
    dtype = model_dtype(target["path"], compat)
    sha = None
    with resident(target, dtype, trust_remote_code=cfg.model.trust_remote_code) as loaded:
        with applied(store, cfg, variant, loaded, target, donor) as matrix_log:
            if save_to is not None:
                sha = save_checkpoint(loaded, target, save_to)
            ckpt = {"ckpt_id": variant["target_id"], "stage": "edit", "step": None, "content_hash": content_hash(target)}
            evals = {s: eval.evaluate_model(loaded.model, loaded.tok, table, cfg, ckpt) for s, table in hands.items()}
    now = datetime.now(timezone.utc)
    vid = {"variant_id": variant["variant_id"]}
    results = [
        meta | vid | {
            "task": cfg.task, "split": split_label(s), "eval_protocol_id": summary["config_hash"][0], "seed": cfg.eval.decoding.seed,
            "n_hands": summary["n"][0], "n_correct": summary["k"][0], "accuracy": summary["accuracy"][0],
            "accuracy_ci_low": summary["accuracy_ci_low"][0], "accuracy_ci_high": summary["accuracy_ci_high"][0],
            "gap_significant": False, "evaluated_at": now,
        }
        for s, (_, summary) in evals.items()
    ]  # fmt: skip
    attempts = pl.concat([a.with_columns(split=pl.lit(split_label(s))) for s, (a, _) in evals.items()])
    columns = list(schemas(benchmark.of(cfg))["edit_eval_attempts"])
    attempts = attempts.with_columns(**{k: pl.lit(v, STR) for k, v in (meta | vid).items()}).select(columns)
    return {
        "edit_variants": pl.DataFrame([variant_row(cfg, variant, target, matrix_log, dtype, sha, now)], schema=VARIANTS_SCHEMA),
        "edit_matrix_log": pl.DataFrame([meta | vid | r for r in matrix_log], schema=MATRIX_LOG_SCHEMA),
        "edit_eval_results": pl.DataFrame(results, schema=RESULTS_SCHEMA),
        "edit_eval_attempts": attempts,
    }


def variant_row(cfg: StudyConfig, variant: dict, target: dict, matrix_log: list[dict], dtype, sha: str | None, now: datetime) -> dict:
    """The `edit_variants` row: the variant's fields and what its edit did."""
    compat = variant["reference_compat"]
    params = [r["param"] for r in matrix_log]
    embeddings = any(EMBEDDING.fullmatch(p) for p in params)
    tied = tied_embeddings(Path(target["path"]), set(tensor_index(target["path"])))
    if compat:
        patterns = [".*"]  # quirk 3: every 2-D parameter
    else:
        patterns = list(cfg.svd.include) + [EMBEDDING.pattern] * cfg.svd.include_embeddings + [LM_HEAD.pattern] * cfg.svd.include_lm_head
    if variant["modules"]:  # and, for a module filter, the name must also match this one
        patterns.append(rf"(?:.*\.)?(?:{'|'.join(variant['modules'])})_proj\.weight")
    changes = [r["rel_change_vs_target"] for r in matrix_log if r["rel_change_vs_target"] is not None]
    return run_meta(cfg) | {
        k: variant[k] for k in ("variant_id", "experiment", "method", "donor_id", "target_id", "k_top_spec", "k_tail_spec", "layers_spec", "layers", "reference_compat")
    } | {
        "edit_embeddings": embeddings, "edit_lm_head": any(LM_HEAD.fullmatch(p) for p in params) or (tied and embeddings),
        "include_patterns": patterns, "n_matrices_selected": len(matrix_log),
        "n_matrices_edited": sum(r["n_indices"] > 0 for r in matrix_log), "n_full_reset": sum(r["full_reset"] for r in matrix_log),
        "mean_rel_change_vs_target": float(np.mean(changes)) if changes else None, "model_dtype": str(dtype).removeprefix("torch."),
        "saved": sha is not None, "weights_sha256": sha,
        "config_hash": stable_hash({k: v for k, v in variant.items() if k != "variant_id"} | {"svd": cfg.svd.model_dump(), "hf_model_type": hf_config(target["path"]).get("model_type")}),
        "created_at": now,
    }  # fmt: skip


def run_variant(
    store: Store, cfg: StudyConfig, variant: dict, roles: pl.DataFrame, checkpoints: pl.DataFrame, data_path: str | Path, art: Artifact | None = None,
) -> Path:
    """Edit, evaluate and seal one variant, or find the sealed result (`art`, the task's
    artifact, else derived here)."""
    _check_roles(variant, roles)
    rows = _rows(checkpoints)
    target, donor = rows[variant["target_id"]], rows.get(variant["donor_id"])
    hands = {s: eval._hands(Path(data_path), s) for s in benchmark.of(cfg).splits}
    art = art or artifact(store, cfg, variant, checkpoints, data_path)

    def build(tmp: Path) -> dict:
        save_to = tmp / "checkpoint" if saves(cfg, variant) else None
        tables = edit_and_evaluate(store, cfg, variant, target, donor, hands, save_to)
        for name in STAGE.tables:
            write_parquet(tables[name], tmp / f"{name}.parquet")
        acc = dict(tables["edit_eval_results"].select("split", "accuracy").rows())
        v = tables["edit_variants"].row(0, named=True)
        log.info("edit %s: %d/%d matrices edited, accuracy %s", variant["variant_id"], v["n_matrices_edited"], v["n_matrices_selected"], acc)
        return {"variant_id": variant["variant_id"], "accuracy": acc}

    return STAGE.build(art, build)


def _run_name(parameters: dict) -> str:
    return f"edit {parameters['variant']['variant_id']}"


@task(name=STAGE.name, task_run_name=_run_name)
def stage(artifact: Artifact, cfg: StudyConfig, variant: dict, roles: str, checkpoints: str | list[str], data: str) -> str:
    """One variant. `roles`: the svd artifact (or its checkpoint_roles.parquet); `checkpoints`:
    the checkpoints Parquet file(s); `data`: the data artifact."""
    maybe_fail("edit")
    store = open_store(artifact.root)
    with gpu_lease(cfg.runner):
        return str(run_variant(store, cfg, variant, read_roles(roles), read_checkpoints(checkpoints), Path(data), art=artifact))


# ---------------------------------------------------------------------------- the study tables


def hand_outcomes(attempts: pl.DataFrame, bench: Benchmark) -> pl.DataFrame:
    """One row per (variant_id, split, hand_index): solved within the episode (as eval's accuracy)."""
    return attempts.group_by("variant_id", "split", "hand_index").agg(solved=solved(bench).any()).sort("variant_id", "split", "hand_index")


def with_recovery(results: pl.DataFrame, edit_variants: pl.DataFrame, attempts: pl.DataFrame, resamples: int, seed: int, bench: Benchmark) -> pl.DataFrame:
    """§4.4: donor / target accuracy from the baselines of the same protocol (reference_compat
    included), ρ with its paired bootstrap CI over hands, and E5's damage fraction."""
    info = {r["variant_id"]: r for r in edit_variants.to_dicts()}
    base = {(r["target_id"], r["reference_compat"]): r["variant_id"] for r in info.values() if r["method"] == "none"}
    hands: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    for (vid, split), g in hand_outcomes(attempts, bench).group_by("variant_id", "split"):
        hands[(vid, split)] = (g["hand_index"].to_numpy(), g["solved"].to_numpy())

    def outcome(vid: str | None, split: str) -> np.ndarray | None:
        return hands[(vid, split)][1] if (vid, split) in hands else None

    rows = []
    for r in results.to_dicts():
        v = info[r["variant_id"]]
        out = {"donor_accuracy": None, "target_accuracy": None, "recovery_fraction": None, "recovery_ci_low": None, "recovery_ci_high": None, "gap_significant": False, "damage_fraction": None}
        if v["method"] == "none":
            out["target_accuracy"] = r["accuracy"]
        else:
            d_vid, t_vid = (base.get((v[f"{side}_id"], v["reference_compat"])) for side in ("donor", "target"))
            e, d, t = (outcome(x, r["split"]) for x in (r["variant_id"], d_vid, t_vid))
            if d is not None:
                out["donor_accuracy"] = float(d.mean())
            if t is not None:
                out["target_accuracy"] = float(t.mean())
            if d is not None and t is not None:
                ids = [hands[(x, r["split"])][0] for x in (r["variant_id"], d_vid, t_vid)]
                if not (np.array_equal(ids[0], ids[1]) and np.array_equal(ids[0], ids[2])):
                    raise ValueError(f"edit_eval_attempts: variant {r['variant_id']} and its baselines were evaluated on different {r['split']} hands")
                rec = paired_bootstrap(e, d, t, resamples, seed)
                out |= {"recovery_fraction": rec.rho, "recovery_ci_low": rec.ci_low, "recovery_ci_high": rec.ci_high, "gap_significant": rec.gap_significant}
                if v["experiment"] == "E5":
                    out["damage_fraction"] = damage_fraction(r["accuracy"], out["donor_accuracy"], out["target_accuracy"])
        rows.append(r | out)
    return pl.DataFrame(rows, schema=RESULTS_SCHEMA).sort("variant_id", "split")


def collect(paths: Sequence[str | Path], cfg: StudyConfig) -> dict[str, pl.DataFrame]:
    """The study tables from the per-variant artifacts."""
    bench = benchmark.of(cfg)
    schema = schemas(bench)
    tables = {name: pl.concat([pl.read_parquet(Path(p) / f"{name}.parquet") for p in paths], how="vertical").cast(schema[name]) for name in STAGE.tables}
    e = cfg.edit
    tables["edit_eval_results"] = with_recovery(tables["edit_eval_results"], tables["edit_variants"], tables["edit_eval_attempts"], e.bootstrap_resamples, e.bootstrap_seed, bench)
    return tables


def collect_artifact(store: Store, cfg: StudyConfig, paths: Sequence[str | Path]) -> Artifact:
    config = {"collect": sorted(Store.from_path(p).key for p in paths), "bootstrap": [cfg.edit.bootstrap_resamples, cfg.edit.bootstrap_seed]}
    return STAGE.artifact(store, config)


@task(name=f"{STAGE.name}-tables", task_run_name="edit tables")
def collect_stage(artifact: Artifact, cfg: StudyConfig, paths: list[str]) -> str:
    """The study tables, gathered from every variant (and ρ computed across them)."""

    def build(tmp: Path) -> dict:
        tables = collect(paths, cfg)
        for name in STAGE.tables:
            write_parquet(tables[name], tmp / f"{name}.parquet")
        return {"rows": {n: t.height for n, t in tables.items()}}

    return str(STAGE.build(artifact, build))


def run(store: Store, cfg: StudyConfig, roles: pl.DataFrame, checkpoints: pl.DataFrame, data_path: str | Path) -> Path | None:
    """The whole sweep in this process, without Prefect: every variant, then the tables."""
    paths = [run_variant(store, cfg, v, roles, checkpoints, data_path) for v in plan(cfg, roles, checkpoints)]
    if not paths:
        return None
    return Path(collect_stage.fn(collect_artifact(store, cfg, paths), cfg, [str(p) for p in paths]))
