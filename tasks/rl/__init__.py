"""Stage `rl`: one independent RL run per starting checkpoint (training.md §3-§5).

    from tasks import rl
    path = rl.run(store, cfg, start_ckpt, data_path)   # start_ckpt: a row of a checkpoints table

`rl.algorithm: ppo` is the authors' PPO in our code (`ppo.py`, rollouts in `rollout.py`);
`grpo` is TRL's GRPOTrainer (`grpo.py`). Both train on `deal("id", rl.seed, i)` with
evaluation hands skipped (GP §2) — the same hand sequence for every run of a study.

Store layout for one run (key K = the rl config, the starting checkpoint, the data):
- `rl/K-s<update>/`: one sealed, standalone HF checkpoint per listed update > 0 (PPO
  adds `value_head.safetensors`); update 0 is the starting checkpoint, registered only;
- `rl/.work/K/`: the latest resume point (PPO: `resume-<update>.pt` with optimizer, LR
  schedule, RNG states, the episodes in flight and the log so far; GRPO: TRL's
  trainer checkpoint); deleted once the run is sealed;
- `rl/K/`: the sealed run, tables `checkpoints` (CHECKPOINTS_SCHEMA: ckpt_id
  `rl-{from_step}-{update}`, parent = the starting ckpt_id) and `rl_log` (log_schema,
  one row per update).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
from prefect import task

from rlheal.caching import Stage, open_store
from rlheal.config import StudyConfig
from rlheal.faults import maybe_fail
from rlheal.runners import gpu_lease
from rlheal.store import Artifact, Store, write_parquet
from tasks import benchmark
from tasks.lm import GLOBAL_RNG
from tasks.rl import common, grpo, ppo
from tasks.rl.common import CHECKPOINTS_SCHEMA, VALUE_HEAD, log_schema

STAGE = Stage("rl", version="1", tables=("checkpoints", "rl_log"))
OPTIONAL_PPO = {"critic_detached": False}  # rl.ppo fields keyed only when not at this value
__all__ = ["CHECKPOINTS_SCHEMA", "STAGE", "VALUE_HEAD", "artifact", "collect", "collect_artifact", "collect_stage", "run", "log_schema", "stage", "start_steps"]


def start_steps(cfg: StudyConfig) -> list[int]:
    """The SFT steps RL starts from (step 0 = the base model)."""
    if cfg.rl.from_steps == "all":  # every row of the checkpoints table, the base always among them
        return [0, *(k for k in cfg.sft.save_steps if k > 0)]
    return list(cfg.rl.from_steps)


def run_checkpoints(run_dir: str | Path) -> list[dict]:
    """The checkpoints a sealed run saved (its step 0, the start, is the SFT checkpoint)."""
    return pl.read_parquet(Path(run_dir) / "checkpoints.parquet").filter(pl.col("step") > 0).sort("step").to_dicts()


def key_config(cfg: StudyConfig, start: dict) -> dict:
    """What a run depends on: the active algorithm's settings, the starting checkpoint (its
    labels are written into the tables), the evaluation hands the stream skips, the
    verifier and the chat rendering."""
    rl = cfg.rl
    unused = {"from_steps", "allow_greedy_rollouts"}  # which runs exist; a validation switch
    if rl.algorithm == "ppo":
        section = rl.model_dump(exclude={*unused, "grpo"})
        # Switches added to the authors' PPO enter the key only when on: off, the run is the
        # one sealed before the switch existed, and stays a cache hit.
        for switch, off in OPTIONAL_PPO.items():
            if section["ppo"][switch] == off:
                del section["ppo"][switch]
    else:  # GRPO samples with rl.grpo.decoding, not rl.decoding
        section = rl.model_dump(exclude={*unused, "ppo", "decoding"})
    return {
        "rl": section,
        "start": {k: start[k] for k in ("ckpt_id", "step", "content_hash")},
        "task": cfg.task,
        "skip": {"eval_seed": cfg.data.eval_seed, "eval_size": cfg.data.eval_size, "overlap": cfg.data.overlap},
        "verifier": cfg.verifier.model_dump(),
        "date_string": cfg.chat.date_string,
    }


def artifact(store: Store, cfg: StudyConfig, start_ckpt: dict, data_art: Artifact) -> Artifact:
    return STAGE.artifact(store, key_config(cfg, start_ckpt), inputs=[data_art])


def _check_data(cfg: StudyConfig, data_path: Path) -> None:
    """The examples skipped are those the data stage stored for evaluation (checked, not assumed)."""
    bench = benchmark.of(cfg)
    tables = [Path(data_path) / f"eval_set_{s}.parquet" for s in bench.splits]
    stored = {pl.read_parquet(t, columns=["eval_set_hash"])["eval_set_hash"][0] for t in tables if t.is_file()}
    ours = benchmark.eval_set_hash(bench, benchmark.eval_examples(bench, cfg.data.eval_seed, cfg.data.eval_size))
    if stored and stored != {ours}:
        raise ValueError(f"{data_path}: its evaluation set {sorted(stored)} is not the one of data.eval_seed/eval_size ({ours}); rebuild the data stage")


def run(store: Store, cfg: StudyConfig, start_ckpt: dict, data_path: Path) -> Path:
    """RL from one starting checkpoint; plain function, no Prefect needed."""
    return make(artifact(store, cfg, start_ckpt, Store.from_path(data_path)), cfg, start_ckpt, Path(data_path))


@task(name=STAGE.name, task_run_name="rl from={start_step}")
def stage(artifact: Artifact, cfg: StudyConfig, ckpt: dict, start_step: int, data: str) -> str:
    """`start_step` names the task run."""
    maybe_fail("rl")
    with gpu_lease(cfg.runner):
        return str(make(artifact, cfg, ckpt, Path(data)))


def make(run_art: Artifact, cfg: StudyConfig, start_ckpt: dict, data_path: Path) -> Path:
    """RL run `run_art` from one starting checkpoint (a `checkpoints` row as a dict) on the
    data artifact's hand stream. Resumes a killed run at its last saved update; a sealed run
    is a cache hit."""
    store = open_store(run_art.root)
    if store.is_sealed(run_art):
        return run_art.path
    _check_data(cfg, data_path)
    train = ppo.train if cfg.rl.algorithm == "ppo" else grpo.train

    def build(tmp: Path) -> dict:
        with GLOBAL_RNG:  # sampling reproducible whatever else runs in this process
            rows = train(store, run_art, cfg, start_ckpt, common.evaluation_keys(cfg))
        write_parquet(common.checkpoints_frame(store, run_art, cfg, start_ckpt), tmp / "checkpoints.parquet")
        write_parquet(common.log_frame(rows, benchmark.of(cfg).outcomes), tmp / "rl_log.parquet")
        return {"algorithm": cfg.rl.algorithm, "start": start_ckpt["ckpt_id"], "updates": cfg.rl.save_steps}

    path = STAGE.build(run_art, build)
    shutil.rmtree(run_art.work_dir, ignore_errors=True)
    return path


def collect(paths: list[str | Path]) -> dict[str, pl.DataFrame]:
    """The study-wide `checkpoints` and `rl_log` tables: every run's rows, one table each."""
    return {t: pl.concat([pl.read_parquet(Path(p) / f"{t}.parquet") for p in paths], how="vertical") for t in STAGE.tables}


def collect_artifact(store: Store, sft_dir: str | Path, paths: list[str | Path]) -> Artifact:
    keys = [Store.from_path(sft_dir).key, *sorted(Store.from_path(p).key for p in paths)]
    return STAGE.artifact(store, {"combined": keys})


@task(name=f"{STAGE.name}-tables", task_run_name="rl tables")
def collect_stage(artifact: Artifact, sft_dir: str, paths: list[str]) -> str:
    """The study-wide `checkpoints` (base, SFT and RL rows; an RL run's step 0 is its SFT
    start, listed once) and `rl_log` tables, gathered from the SFT run and every RL run."""

    def build(tmp: Path) -> dict:
        ckpts = pl.read_parquet(Path(sft_dir) / "checkpoints.parquet")
        if paths:
            runs = collect(paths)
            ckpts = pl.concat([ckpts, runs["checkpoints"].filter(pl.col("step") > 0)], how="diagonal_relaxed")
            write_parquet(runs["rl_log"], tmp / "rl_log.parquet")
        write_parquet(ckpts, tmp / "checkpoints.parquet")
        return {"rows": ckpts.height}

    return str(STAGE.build(artifact, build))
