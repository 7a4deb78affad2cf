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
  `rl-{from_step}-{update}`, parent = the starting ckpt_id) and `rl_log` (LOG_SCHEMA,
  one row per update).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
from prefect import task

from rlheal.config import StudyConfig
from rlheal.faults import maybe_fail
from rlheal.store import Artifact, Store, write_parquet
from tasks.data import eval_hands, eval_set_hash
from tasks.models import GLOBAL_RNG
from tasks.rl import common, grpo, ppo
from tasks.rl.common import CHECKPOINTS_SCHEMA, LOG_SCHEMA, VALUE_HEAD

VERSION = "1"
OPTIONAL_PPO = {"critic_detached": False}  # rl.ppo fields keyed only when not at this value
TABLES = ("checkpoints", "rl_log")
__all__ = ["CHECKPOINTS_SCHEMA", "LOG_SCHEMA", "TABLES", "VALUE_HEAD", "artifact", "collect", "run", "stage", "starts"]


def starts(cfg: StudyConfig, checkpoints: pl.DataFrame) -> list[dict]:
    """The rows of an SFT `checkpoints` table that RL starts from (`rl.from_steps`)."""
    rows = checkpoints.sort("step").to_dicts()
    return rows if cfg.rl.from_steps == "all" else [r for r in rows if r["step"] in cfg.rl.from_steps]


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
    else:  # GRPO takes its generation settings from rl.grpo, not rl.decoding
        section = {**rl.model_dump(exclude={*unused, "ppo", "decoding"}), "seed_torch": rl.decoding.seed}
    return {
        "rl": section,
        "start": {k: start[k] for k in ("ckpt_id", "step", "content_hash")},
        "skip": {"eval_seed": cfg.data.eval_seed, "eval_size": cfg.data.eval_size, "overlap": cfg.data.overlap},
        "verifier": cfg.verifier.model_dump(),
        "date_string": cfg.chat.date_string,
    }


def artifact(store: Store, cfg: StudyConfig, start_ckpt: dict, data_art_id: str) -> Artifact:
    return store.artifact("rl", key_config(cfg, start_ckpt), inputs=[data_art_id], version=VERSION)


def _check_data(cfg: StudyConfig, data_path: Path) -> None:
    """The hands skipped are those the data stage stored for evaluation (checked, not assumed)."""
    tables = [Path(data_path) / f"eval_{s}.parquet" for s in ("id", "ood")]
    stored = {pl.read_parquet(t, columns=["eval_set_hash"])["eval_set_hash"][0] for t in tables if t.is_file()}
    ours = eval_set_hash(eval_hands(cfg.data.eval_seed, cfg.data.eval_size))
    if stored and stored != {ours}:
        raise ValueError(f"{data_path}: its evaluation set {sorted(stored)} is not the one of data.eval_seed/eval_size ({ours}); rebuild the data stage")


def run(store: Store, cfg: StudyConfig, start_ckpt: dict, data_path: Path) -> Path:
    """RL from one starting checkpoint (a `checkpoints` row as a dict); returns the sealed
    run artifact. Resumes a killed run at its last saved update; a sealed run is a cache hit."""
    run_art = artifact(store, cfg, start_ckpt, Store.from_path(data_path).id)
    if store.is_sealed(run_art):
        return run_art.path
    _check_data(cfg, data_path)
    train = ppo.train if cfg.rl.algorithm == "ppo" else grpo.train

    def build(tmp: Path) -> dict:
        with GLOBAL_RNG:  # sampling reproducible whatever else runs in this process
            rows = train(store, run_art, cfg, start_ckpt, common.evaluation_keys(cfg))
        write_parquet(common.checkpoints_frame(store, run_art, cfg, start_ckpt), tmp / "checkpoints.parquet")
        write_parquet(common.log_frame(rows), tmp / "rl_log.parquet")
        return {"algorithm": cfg.rl.algorithm, "start": start_ckpt["ckpt_id"], "updates": cfg.rl.save_steps}

    path = store.build(run_art, build, config=key_config(cfg, start_ckpt), inputs=[str(start_ckpt["path"]), str(data_path)])
    shutil.rmtree(common.work_dir(run_art), ignore_errors=True)
    return path


def collect(paths: list[str | Path]) -> dict[str, pl.DataFrame]:
    """The study-wide `checkpoints` and `rl_log` tables: every run's rows, one table each."""
    return {t: pl.concat([pl.read_parquet(Path(p) / f"{t}.parquet") for p in paths], how="vertical") for t in TABLES}


@task(name="rl", task_run_name="rl from={start_step}")
def stage(artifact: str, cfg: StudyConfig, ckpt: dict, start_step: int, data: str) -> str:
    maybe_fail("rl")
    from rlheal.caching import open_store

    return str(run(open_store(Store.from_path(artifact).root), cfg, ckpt, Path(data)))


def combined_artifact(store: Store, sft_dir: str | Path, paths: list[str | Path]) -> Artifact:
    keys = [Store.from_path(sft_dir).key, *sorted(Store.from_path(p).key for p in paths)]
    return store.artifact("rl", {"combined": keys}, version=VERSION)


@task(name="rl-tables", task_run_name="rl tables")
def combined_stage(artifact: str, sft_dir: str, paths: list[str]) -> str:
    """The study-wide `checkpoints` (base, SFT and RL rows; an RL run's step 0 is its SFT
    start, listed once) and `rl_log` tables."""
    from rlheal.caching import open_store

    def build(tmp: Path) -> dict:
        ckpts = pl.read_parquet(Path(sft_dir) / "checkpoints.parquet")
        if paths:
            runs = collect(paths)
            ckpts = pl.concat([ckpts, runs["checkpoints"].filter(pl.col("step") > 0)], how="diagonal_relaxed")
            write_parquet(runs["rl_log"], tmp / "rl_log.parquet")
        write_parquet(ckpts, tmp / "checkpoints.parquet")
        return {"rows": ckpts.height}

    art = Store.from_path(artifact)
    return str(open_store(art.root).build(art, build, inputs=[sft_dir, *paths]))
