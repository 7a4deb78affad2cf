"""The study as one Prefect flow: data -> sft -> rl -> eval -> svd -> editing -> report.

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
from tasks import data, editing, evaluate, models, report, sft, svd

SPLITS = ("id", "ood")


@flow(name="rlheal-study", flow_run_name="study {config_path}")
def study(config_path: str, store: str | None = None) -> dict[str, str]:
    cfg = load_config(config_path, store)
    open_store(cfg.store).claim_study(cfg.name, cfg.model_dump(mode="json", exclude={"store"}))
    return stages.with_options(task_runner=task_runner(cfg.runner), flow_run_name=f"{cfg.name}")(cfg)


@flow(name="rlheal-stages")
def stages(cfg: StudyConfig) -> dict[str, str]:
    st = open_store(cfg.store)
    cached = cached_in(st)
    progress = Progress(st.study_dir(cfg.name), cfg.name)

    def stage(name: str):
        return tags(f"study:{cfg.name}", f"stage:{name}")

    with stage("data"):
        data_dir = data.stage.with_options(**cached)(artifact=str(data.artifact(st, cfg)), cfg=cfg)
    st.publish_all(cfg.name, Path(data_dir), data.TABLES)
    progress.done("data", "data")

    with stage("model"):
        model_dir = models.stage.with_options(**cached)(artifact=str(models.artifact(st, cfg)), cfg=cfg)
    progress.done("model", "model")

    with stage("sft"), gpu_slot(cfg.runner):
        sft_art = sft.artifact(st, cfg, st.from_path(model_dir), st.from_path(data_dir))
        sft_dir = sft.stage.with_options(**cached)(artifact=str(sft_art), cfg=cfg, model=model_dir, data=data_dir)
    st.publish_all(cfg.name, Path(sft_dir), sft.TABLES)
    progress.done("sft", "sft")
    checkpoints = pl.read_parquet(Path(sft_dir) / "checkpoints.parquet")

    with stage("eval"), gpu_slot(cfg.runner):
        eval_dir = evaluate_all(cfg, st, cached, progress, checkpoints, data_dir)
    st.publish_all(cfg.name, Path(eval_dir), evaluate.TABLES)
    publish_summary(cfg.name, Path(eval_dir))

    with stage("svd"), gpu_slot(cfg.runner):
        ckpt_tables = [str(Path(sft_dir) / "checkpoints.parquet")]
        summary = str(Path(eval_dir) / "eval_summary.parquet")
        svd_art = svd.artifact(st, cfg, svd.artifact_inputs(cfg, svd.read_checkpoints(ckpt_tables), pl.read_parquet(summary)))
        svd_dir = svd.stage.with_options(**cached)(artifact=str(svd_art), cfg=cfg, checkpoints=ckpt_tables, eval_summary=summary)
    st.publish_all(cfg.name, Path(svd_dir), svd.TABLES)
    progress.done("svd", "svd")

    with stage("editing"), gpu_slot(cfg.runner):
        edit_dir = edit_all(cfg, st, cached, progress, svd_dir, ckpt_tables, data_dir)
    if edit_dir:
        st.publish_all(cfg.name, Path(edit_dir), editing.TABLES)

    with stage("report"):
        report_dir = report.stage(study_dir=str(st.study_dir(cfg.name)), title=cfg.name)
    progress.done("report", "report")

    return {"data": data_dir, "model": model_dir, "sft": sft_dir, "eval": eval_dir, "svd": svd_dir, "editing": edit_dir, "report": report_dir}


def publish_summary(study: str, eval_dir: Path) -> None:
    """The evaluation summary as a table artifact in the Prefect UI."""
    from prefect.artifacts import create_table_artifact

    cols = ["ckpt_id", "step", "split", "k", "n", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "format_error_rate", "ce"]
    rows = pl.read_parquet(eval_dir / "eval_summary.parquet").select(cols).sort("split", "step").with_columns(pl.selectors.float().round(4))
    create_table_artifact(rows.to_dicts(), key=artifact_key(study, "eval-summary"), description=f"{study}: accuracy per checkpoint and split")


def evaluate_all(cfg: StudyConfig, st, cached: dict, progress: Progress, checkpoints: pl.DataFrame, data_dir: str) -> str:
    """One cached task per (checkpoint, split), run in parallel where the runner has room;
    then one table of all of them."""
    rows = checkpoints.to_dicts()
    progress.expect("eval", [f"eval {c['ckpt_id']} {s}" for c in rows for s in SPLITS])
    task = evaluate.stage.with_options(**cached)
    futures = {
        task.submit(artifact=str(evaluate.artifact(st, cfg, c, s, Path(data_dir))), cfg=cfg, ckpt=c, split=s, data=data_dir): f"eval {c['ckpt_id']} {s}"
        for c in rows
        for s in SPLITS
    }
    paths = []
    for fut in as_completed(list(futures)):
        paths.append(fut.result())
        progress.done("eval", futures[fut])
    combined = evaluate.collect_artifact(st, paths)
    return evaluate.collect_stage.with_options(**cached)(artifact=str(combined), paths=sorted(paths))


def edit_all(cfg: StudyConfig, st, cached: dict, progress: Progress, svd_dir: str, ckpt_tables: list[str], data_dir: str) -> str | None:
    """One cached task per editing variant (baselines included), then their tables."""
    roles, checkpoints = editing.read_roles(svd_dir), svd.read_checkpoints(ckpt_tables)
    variants = editing.plan(cfg, roles, checkpoints)
    if not variants:
        return None
    progress.expect("editing", [v["variant_id"] for v in variants])
    task = editing.stage.with_options(**cached)
    futures = {
        task.submit(artifact=str(editing.artifact(st, cfg, v, checkpoints, Path(data_dir))), cfg=cfg, variant=v, roles=svd_dir, checkpoints=ckpt_tables, data=data_dir): v["variant_id"]
        for v in variants
    }
    paths = []
    for fut in as_completed(list(futures)):
        paths.append(fut.result())
        progress.done("editing", futures[fut])
    combined = editing.collect_artifact(st, cfg, paths)
    return editing.collect_stage.with_options(**cached)(artifact=str(combined), cfg=cfg, paths=sorted(paths))
