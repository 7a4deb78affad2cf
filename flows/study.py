"""The study as one Prefect flow: data -> model (-> pretrain) -> sft -> rl -> eval -> svd -> edit -> report.

Every stage is a cached task whose result is the path of a sealed store artifact, so
running a study again (from the CLI, or by retrying the flow run) recomputes only what
is missing. `study` loads the config and picks the task runner; `stages` is the DAG.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from prefect import flow, tags
from prefect.futures import as_completed

from rlheal.caching import cached_in, open_store
from rlheal.config import StudyConfig, load_config
from rlheal.progress import Progress, artifact_key
from rlheal.runners import gpu_slot, task_runner
from tasks import benchmark, data, edit, eval, model, pretrain, report, rl, sft, svd


@flow(name="rlheal-study", flow_run_name="study {config_path}")
def study(config_path: str, store: str | None = None, overrides: list[str] | None = None) -> dict[str, str]:
    cfg = load_config(config_path, store, overrides or ())
    open_store(cfg.store).claim_study(cfg.name, cfg.claim())
    return stages.with_options(task_runner=task_runner(cfg.runner), flow_run_name=f"{cfg.name}")(cfg)


@flow(name="rlheal-stages")
def stages(cfg: StudyConfig) -> dict[str, str]:
    st = open_store(cfg.store)
    cached = cached_in(st)
    progress = Progress(st.study_dir(cfg.name), cfg.name)

    def stage(name: str):
        return tags(f"study:{cfg.name}", f"stage:{name}")

    with stage("data"):
        data_art = data.artifact(st, cfg)
        data_dir = data.stage.with_options(**cached)(artifact=data_art, cfg=cfg)
    st.publish_all(cfg.name, Path(data_dir), data.STAGE.tables)
    progress.done("data", "data")

    with stage("model"):
        model_art = model.artifact(st, cfg)
        model_dir = model.stage.with_options(**cached)(artifact=model_art, cfg=cfg)
    progress.done("model", "model")

    if cfg.pretrain.enabled:  # builtin models only: a base with knowledge to lose
        with stage("pretrain"):
            model_art = pretrain.artifact(st, cfg, model_art)
            model_dir = pretrain.stage.with_options(**cached)(artifact=model_art, cfg=cfg, model=model_dir)
        progress.done("pretrain", "pretrain")

    with stage("sft"), gpu_slot(cfg.runner):
        checkpoints = [f"step {k}" for k in cfg.sft.save_steps if k > 0]
        progress.expect("sft", checkpoints)  # the task marks each checkpoint as it is sealed
        sft_art = sft.artifact(st, cfg, model_art, data_art)
        sft_dir = sft.stage.with_options(**cached)(artifact=sft_art, cfg=cfg, model=model_dir, data=data_dir)
    st.publish_all(cfg.name, Path(sft_dir), sft.STAGE.tables)
    for label in checkpoints:  # also when the whole stage came from the cache
        progress.done("sft", label)

    with stage("rl"), gpu_slot(cfg.runner):
        ckpt_dir = rl_all(cfg, st, cached, progress, sft_dir, data_art)
    st.publish_all(cfg.name, Path(ckpt_dir), [t for t in rl.STAGE.tables if (Path(ckpt_dir) / f"{t}.parquet").exists()])
    ckpt_tables = [str(Path(ckpt_dir) / "checkpoints.parquet")]

    with stage("eval"), gpu_slot(cfg.runner):
        eval_dir = evaluate_all(cfg, st, cached, progress, ckpt_tables, data_dir)
    st.publish_all(cfg.name, Path(eval_dir), eval.STAGE.tables)
    publish_summary(cfg, st.tables_dir(cfg.name))

    with stage("svd"), gpu_slot(cfg.runner):
        summary = str(Path(eval_dir) / "eval_summary.parquet")
        svd_art = svd.artifact(st, cfg, ckpt_tables, summary)
        edit_columns = edit.column_requests(cfg)  # decomposed in svd's one pass, for the edit stage
        svd_dir = svd.stage.with_options(**cached)(artifact=svd_art, cfg=cfg, checkpoints=ckpt_tables, eval_summary=summary, edit_columns=edit_columns)
    st.publish_all(cfg.name, Path(svd_dir), svd.STAGE.tables)
    progress.done("svd", "svd")

    with stage("edit"), gpu_slot(cfg.runner):
        edit_dir = edit_all(cfg, st, cached, progress, svd_dir, ckpt_tables, data_dir)
    if edit_dir:
        st.publish_all(cfg.name, Path(edit_dir), edit.STAGE.tables)

    with stage("report"):
        report_dir = report.stage(tables=str(st.tables_dir(cfg.name)), out=str(st.report_dir(cfg.name)), title=cfg.name, task=cfg.task)
    progress.done("report", "report")

    return {"data": data_dir, "model": model_dir, "sft": sft_dir, "rl": ckpt_dir, "eval": eval_dir, "svd": svd_dir, "edit": edit_dir, "report": report_dir}


def publish_summary(cfg: StudyConfig, tables: Path) -> None:
    """Table artifacts in the Prefect UI: accuracy per checkpoint, and OOD before/after RL."""
    from prefect.artifacts import create_table_artifact

    study = cfg.name
    t = report.read_tables(tables)
    cols = ["ckpt_id", "stage", "step", "split", "k", "n", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "format_error_rate", "ce"]
    rows = t["eval_summary"].select(cols).sort("split", "stage", "step").with_columns(pl.selectors.float().round(4))
    create_table_artifact(rows.to_dicts(), key=artifact_key(study, "eval-summary"), description=f"{study}: accuracy per checkpoint and split")
    if (recovery := report.rl_recovery(t, benchmark.of(cfg))) is not None:
        create_table_artifact(recovery.with_columns(pl.selectors.float().round(4)).to_dicts(), key=artifact_key(study, "rl-recovery"), description=f"{study}: OOD accuracy before and after RL, per starting SFT step")


def fan_out(task, calls: dict[str, dict], progress: Progress, stage: str) -> list[str]:
    """Submit one task run per labelled call; progress advances as each one finishes."""
    progress.expect(stage, list(calls))
    futures = {task.submit(**kwargs): label for label, kwargs in calls.items()}
    paths = []
    for fut in as_completed(list(futures)):
        paths.append(fut.result())
        progress.done(stage, futures[fut])
    return sorted(paths)


def rl_all(cfg: StudyConfig, st, cached: dict, progress: Progress, sft_dir: str, data_art) -> str:
    """An independent RL run from each chosen SFT checkpoint, in parallel where the runner
    has room; returns the artifact with the study-wide `checkpoints` and `rl_log`."""
    calls = {
        f"rl from={c['step']}": dict(artifact=rl.artifact(st, cfg, c, data_art), cfg=cfg, ckpt=c, start_step=c["step"], data=str(data_art.path))
        for c in rl.starts(cfg, pl.read_parquet(Path(sft_dir) / "checkpoints.parquet"))
    }
    paths = fan_out(rl.stage.with_options(**cached), calls, progress, "rl")
    return rl.collect_stage.with_options(**cached)(artifact=rl.collect_artifact(st, sft_dir, paths), sft_dir=sft_dir, paths=paths)


def evaluate_all(cfg: StudyConfig, st, cached: dict, progress: Progress, ckpt_tables: list[str], data_dir: str) -> str:
    """One cached task per (checkpoint, split), run in parallel where the runner has room;
    then one table of all of them."""
    calls = {
        f"eval {eval.describe(c)} {s}": dict(artifact=eval.artifact(st, cfg, c, s, Path(data_dir)), cfg=cfg, ckpt=c, split=s, data=data_dir)
        for c in svd.read_checkpoints(ckpt_tables).to_dicts()
        for s in benchmark.of(cfg).splits
    }
    paths = fan_out(eval.stage.with_options(**cached), calls, progress, "eval")
    return eval.collect_stage.with_options(**cached)(artifact=eval.collect_artifact(st, paths), paths=paths)


def edit_all(cfg: StudyConfig, st, cached: dict, progress: Progress, svd_dir: str, ckpt_tables: list[str], data_dir: str) -> str | None:
    """One cached task per editing variant (baselines included), then their tables."""
    roles, checkpoints = edit.read_roles(svd_dir), svd.read_checkpoints(ckpt_tables)
    variants = edit.plan(cfg, roles, checkpoints)
    if not variants:
        return None
    calls = {
        v["variant_id"]: dict(artifact=edit.artifact(st, cfg, v, checkpoints, Path(data_dir)), cfg=cfg, variant=v, roles=svd_dir, checkpoints=ckpt_tables, data=data_dir)
        for v in variants
    }
    paths = fan_out(edit.stage.with_options(**cached), calls, progress, "edit")
    return edit.collect_stage.with_options(**cached)(artifact=edit.collect_artifact(st, cfg, paths), cfg=cfg, paths=paths)
