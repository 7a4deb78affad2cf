"""The study as one Prefect flow: data -> model (-> pretrain) -> sft -> rl -> eval -> svd -> edit -> report.

Every stage is a cached task whose result is the path of a sealed store artifact, so
running a study again (from the CLI, or by retrying the flow run) recomputes only what
is missing. The flow streams (issue 18): each task is submitted as soon as what it reads is
sealed. SFT seals a checkpoint at each saved step, and its evaluations and the RL runs
that start from it are submitted then, while SFT trains on; an RL run's checkpoints are
evaluated as the run ends. Once every SFT checkpoint's OOD evaluation is in (B is picked
from them), each checkpoint the SVD analysis reads is decomposed, beside RL; the analysis
itself reads every evaluation, edit reads SVD, the report reads everything. `study` loads the config and
picks the task runner; `stages` is the DAG. A failed task stops only what reads it: the rest
of the study goes on, and the failure is raised where its stage's results are first read.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import polars as pl
from prefect import flow, tags

from flows.streaming import Stream, sealed_or_run
from rlheal.caching import cached_in, open_store
from rlheal.config import StudyConfig, load_config
from rlheal.progress import Progress, artifact_key
from rlheal.runners import gpu_slot, task_runner
from tasks import benchmark, data, drift, edit, eval, model, pretrain, report, rl, sft, svd


@flow(name="rlheal-study", flow_run_name="study {config_path}")
def study(config_path: str, store: str | None = None, overrides: list[str] | None = None) -> dict[str, str]:
    cfg = load_config(config_path, store, overrides or ())
    open_store(cfg.store).claim_study(cfg.name, cfg.claim())
    try:
        return stages.with_options(task_runner=task_runner(cfg.runner), flow_run_name=f"{cfg.name}")(cfg)
    finally:  # failed or done, nothing of this run runs any more
        Progress(open_store(cfg.store).study_dir(cfg.name), cfg.name).running({})


@flow(name="rlheal-stages")
def stages(cfg: StudyConfig) -> dict[str, str]:
    st = open_store(cfg.store)
    cached = cached_in(st)
    progress = Progress(st.study_dir(cfg.name), cfg.name)

    def stage(name: str):
        return tags(f"study:{cfg.name}", f"stage:{name}")

    with stage("data"):
        data_art = data.artifact(st, cfg)
        data_dir = sealed_or_run(data.stage.with_options(**cached), data_art, cfg=cfg)
    st.publish_all(cfg.name, Path(data_dir), data.STAGE.tables)
    progress.done("data", "data")

    with stage("model"):
        model_art = model.artifact(st, cfg)
        model_dir = sealed_or_run(model.stage.with_options(**cached), model_art, cfg=cfg)
    progress.done("model", "model")

    if cfg.pretrain.enabled:  # builtin models only: a base with knowledge to lose
        with stage("pretrain"):
            model_art = pretrain.artifact(st, cfg, model_art)
            model_dir = sealed_or_run(pretrain.stage.with_options(**cached), model_art, cfg=cfg, model=model_dir)
        progress.done("pretrain", "pretrain")

    # sft -> (each checkpoint as it is sealed) eval and rl -> (each run as it ends) eval
    stream = Stream(progress, expected(cfg))
    sft_art = sft.artifact(st, cfg, model_art, data_art)
    with stage("sft"), gpu_slot(cfg.runner):
        stream.submit("sft", None, sft.stage.with_options(**cached), artifact=sft_art, cfg=cfg, model=model_dir, data=data_dir)
    sealed = sft.Sealed(st, sft_art, cfg, Path(model_dir))
    edit_columns = edit.column_requests(cfg)  # decomposed with svd's, for the edit stage
    decompositions = svd.Decompositions(st, cfg, edit_columns)
    starts, held, seen = rl.start_steps(cfg), [], []
    live = drift.Live(cfg.name, progress)
    # On the thread runner RL runs take turns with SFT and with each other on torch's global
    # random stream (tasks/lm.GLOBAL_RNG); submitted at once they would wait in the pool's
    # threads and starve the evaluations, so there they go one at a time once SFT has ended.
    one_at_a_time = cfg.runner.kind == "local"
    while stream.busy or held or not (sealed.complete or stream.failed_in("sft")):
        sft_ended = not stream.count("sft")  # read before the checkpoints: SFT sealed them first
        for ckpt in sealed.new():  # base first, then each saved step as SFT seals it
            if ckpt["step"] > 0:
                progress.done("sft", f"step {ckpt['step']}")
            evaluate(cfg, st, cached, stream, stage, ckpt, data_dir)
            monitor(cfg, st, cached, stream, stage, ckpt, seen, data_dir)
            decompositions.seen(ckpt)
            if ckpt["step"] in starts:
                held.append(ckpt)
        if sft_ended and not sealed.complete and not stream.failed_in("sft"):
            raise RuntimeError(f"sft: the run {sft_art.path} is sealed but not its checkpoints {sealed.missing()}: remove that folder to train it again")
        while held and not (one_at_a_time and (not sft_ended or stream.count("rl"))):
            ckpt = held.pop(0)
            with stage("rl"), gpu_slot(cfg.runner):
                stream.submit("rl", f"rl from={ckpt['step']}", rl.stage.with_options(**cached), artifact=rl.artifact(st, cfg, ckpt, data_art), cfg=cfg, ckpt=ckpt, start_step=ckpt["step"], data=str(data_art.path))
        for stage_name, _, path in stream.ended():
            if stage_name == "rl":
                for ckpt in rl.run_checkpoints(path):
                    evaluate(cfg, st, cached, stream, stage, ckpt, data_dir)
                    monitor(cfg, st, cached, stream, stage, ckpt, seen, data_dir)
                    decompositions.seen(ckpt)
            elif stage_name == "eval":
                decompositions.evaluated(path)
            elif stage_name == "drift":
                live.add(path)
        # each checkpoint's SVD once its columns are known (B: every SFT OOD evaluation in)
        for label, ckpt, columns, art in decompositions.new():
            with stage("svd"), gpu_slot(cfg.runner):
                stream.submit("svd", label, svd.decompose_stage.with_options(**cached), artifact=art, cfg=cfg, ckpt=ckpt, columns=columns, name=label)
    sft_dir = stream.only("sft")
    st.publish_all(cfg.name, Path(sft_dir), sft.STAGE.tables)

    with stage("rl"):
        rl_paths = stream.results("rl")
        ckpt_dir = sealed_or_run(rl.collect_stage.with_options(**cached), rl.collect_artifact(st, sft_dir, rl_paths), sft_dir=sft_dir, paths=rl_paths)
    st.publish_all(cfg.name, Path(ckpt_dir), [t for t in rl.STAGE.tables if (Path(ckpt_dir) / f"{t}.parquet").exists()])
    ckpt_tables = [str(Path(ckpt_dir) / "checkpoints.parquet")]

    with stage("eval"):
        paths = stream.results("eval")
        eval_dir = sealed_or_run(eval.collect_stage.with_options(**cached), eval.collect_artifact(st, paths), paths=paths)
    st.publish_all(cfg.name, Path(eval_dir), eval.STAGE.tables)
    publish_summary(cfg, st.tables_dir(cfg.name))

    with stage("svd"), gpu_slot(cfg.runner):
        stream.results("svd")  # the checkpoints' decompositions, which the analysis reads
        summary = str(Path(eval_dir) / "eval_summary.parquet")
        svd_art = svd.artifact(st, cfg, ckpt_tables, summary)
        # on a worker, as the decompositions: the cache's dtype follows the device it runs on
        stream.submit("svd", "svd", svd.stage.with_options(**cached), artifact=svd_art, cfg=cfg, checkpoints=ckpt_tables, eval_summary=summary, edit_columns=edit_columns)
        stream.results("svd")
        svd_dir = str(svd_art.path)
    st.publish_all(cfg.name, Path(svd_dir), svd.STAGE.tables)

    drift_dir = None
    if cfg.drift.enabled:  # the monitor's picks and correlations read eval and svd
        # closing: the model reads that drift tasks kept in this process (thread runner) are
        # of no further use once the stage has ended or failed
        with stage("drift"), contextlib.closing(drift.READS):
            paths, tables = stream.results("drift"), st.tables_dir(cfg.name)
            reads = [str(tables / f"{t}.parquet") for t in ("eval_summary", "checkpoints", "svd_vs_accuracy", "checkpoint_roles")]
            with gpu_slot(cfg.runner):  # B, S and R read on a worker, once the svd stage has named them
                hidden_art = drift.hidden_artifact(st, cfg, pl.read_parquet(reads[3]), pl.read_parquet(reads[1]), Path(data_dir))
                stream.submit("drift", "drift hidden", drift.hidden_stage.with_options(**cached), artifact=hidden_art, cfg=cfg, roles=reads[3], checkpoints=reads[1], data=data_dir)
                stream.results("drift")
            drift_dir = sealed_or_run(drift.collect_stage.with_options(**cached), drift.collect_artifact(st, cfg, paths, hidden_art.path, reads[:3]), cfg=cfg, paths=paths, hidden_dir=str(hidden_art.path), eval_summary=reads[0], checkpoints=reads[1], svd_vs_accuracy=reads[2])
        st.publish_all(cfg.name, Path(drift_dir), drift.STAGE.tables)
    else:  # a study pointed at a config without the monitor (--force) keeps no stale picks
        st.unpublish(cfg.name, drift.STAGE.tables)

    with stage("edit"), gpu_slot(cfg.runner):
        edit_dir = edit_all(cfg, st, cached, progress, svd_dir, ckpt_tables, data_dir)
    if edit_dir:
        st.publish_all(cfg.name, Path(edit_dir), edit.STAGE.tables)

    with stage("report"):
        report_dir = report.stage(tables=str(st.tables_dir(cfg.name)), out=str(st.report_dir(cfg.name)), title=cfg.name, task=cfg.task)
    progress.done("report", "report")

    return {"data": data_dir, "model": model_dir, "sft": sft_dir, "rl": ckpt_dir, "eval": eval_dir, "svd": svd_dir, "drift": drift_dir, "edit": edit_dir, "report": report_dir}


def evaluate(cfg: StudyConfig, st, cached: dict, stream: Stream, stage, ckpt: dict, data_dir: str) -> None:
    """One cached evaluation task per split of a sealed checkpoint."""
    with stage("eval"), gpu_slot(cfg.runner):
        for s in benchmark.of(cfg).splits:
            stream.submit("eval", f"eval {eval.describe(ckpt)} {s}", eval.stage.with_options(**cached), artifact=eval.artifact(st, cfg, ckpt, s, Path(data_dir)), cfg=cfg, ckpt=ckpt, split=s, data=data_dir)


def monitor(cfg: StudyConfig, st, cached: dict, stream: Stream, stage, ckpt: dict, seen: list[dict], data_dir: str) -> None:
    """The drift task of a sealed checkpoint (the base is only a reference), when the
    monitor is on; `seen`: the checkpoints sealed before it, in order."""
    seen.append(ckpt)
    if not cfg.drift.enabled or ckpt["stage"] == "base":
        return
    base, prev = seen[0], drift.previous(ckpt, seen)
    with stage("drift"), gpu_slot(cfg.runner):
        stream.submit("drift", f"drift {eval.describe(ckpt)}", drift.stage.with_options(**cached), artifact=drift.artifact(st, cfg, ckpt, base, prev, Path(data_dir)), cfg=cfg, ckpt=ckpt, base=base, previous=prev, data=data_dir)


def expected(cfg: StudyConfig) -> dict[str, list[str]]:
    """The progress labels of the streamed stages, known from the config before any runs."""
    splits = benchmark.of(cfg).splits
    steps = [k for k in cfg.sft.save_steps if k > 0]
    starts = rl.start_steps(cfg)
    ckpts = [{"ckpt_id": "base", "stage": "base"}, *({"stage": "sft", "step": k} for k in steps)]
    ckpts += [{"stage": "rl", "rl_start_step": s, "step": u} for s in starts for u in cfg.rl.save_steps if u > 0]
    r_start = cfg.roles.rl_start if cfg.roles.rl_start is not None else max(steps, default=0)
    updates = [u for u in cfg.rl.save_steps if u > 0]
    decomposed = ckpts[: 1 + len(steps)] + ([{"stage": "rl", "rl_start_step": r_start, "step": max(updates)}] if updates and r_start in starts else [])
    return {
        "sft": [f"step {k}" for k in steps],
        "rl": [f"rl from={s}" for s in starts],
        "eval": [f"eval {eval.describe(c)} {s}" for c in ckpts for s in splits],
        "svd": [*(f"svd {eval.describe(c)}" for c in decomposed), "svd"],
        **({"drift": [*(f"drift {eval.describe(c)}" for c in ckpts[1:]), "drift hidden"]} if cfg.drift.enabled else {}),
    }


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


def edit_all(cfg: StudyConfig, st, cached: dict, progress: Progress, svd_dir: str, ckpt_tables: list[str], data_dir: str) -> str | None:
    """One cached task per editing variant (baselines included), then their tables."""
    roles, checkpoints = edit.read_roles(svd_dir), svd.read_checkpoints(ckpt_tables)
    variants = edit.plan(cfg, roles, checkpoints)
    if not variants:
        return None
    stream = Stream(progress, {"edit": [v["variant_id"] for v in variants]})
    for v in variants:
        stream.submit("edit", v["variant_id"], edit.stage.with_options(**cached), artifact=edit.artifact(st, cfg, v, checkpoints, Path(data_dir)), cfg=cfg, variant=v, roles=svd_dir, checkpoints=ckpt_tables, data=data_dir)
    paths = stream.results("edit")
    return sealed_or_run(edit.collect_stage.with_options(**cached), edit.collect_artifact(st, cfg, paths), cfg=cfg, paths=paths)
