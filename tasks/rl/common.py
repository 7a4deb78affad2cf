"""What both RL algorithms share: the training-example stream, checkpoint artifacts, the
resume point and the `rl_log` table (training.md §3.2, §3.5, §4, §5; GP §2)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import torch

from rlheal.config import StudyConfig
from rlheal.store import Artifact, Store
from tasks import benchmark
from tasks.lm import weights_hash

VALUE_HEAD = "value_head.safetensors"
QUANTILES = (0.01, 0.05, 0.25, 0.50, 0.75, 0.95, 0.99)

# ---------------------------------------------------------------------------- examples


def evaluation_keys(cfg: StudyConfig) -> set:
    """Overlap keys of every evaluation example: the training stream skips these (GP §2)."""
    return benchmark.evaluation_keys(benchmark.of(cfg), cfg)


def example_stream(cfg: StudyConfig, exclude: set, start: int = 0) -> Iterator:
    """`deal(<in-distribution split>, rl.seed, i)` for i >= start, evaluation examples
    skipped; the same sequence for every RL run of a study (training.md §3.2)."""
    return benchmark.training_stream(benchmark.of(cfg), cfg.rl.seed, exclude, cfg.data.overlap, start)


# ---------------------------------------------------------------------------- resume point


def save_resume(run: Artifact, update: int, state: dict) -> Path:
    """Write the resume point of `update` atomically (temp file + os.replace); only the
    latest is kept (training.md §5)."""
    d = run.work_dir
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"resume-{update}.pt"
    tmp = d / f".resume-{update}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in d.glob("resume-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def load_resume(run: Artifact) -> dict | None:
    found = sorted(run.work_dir.glob("resume-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return torch.load(found[-1], weights_only=True) if found else None


# ---------------------------------------------------------------------------- tables

CHECKPOINTS_SCHEMA = {
    "ckpt_id": pl.String,  # rl-{from_step}-{update}
    "stage": pl.String,
    "step": pl.Int32,  # update; 0 = the starting checkpoint itself
    "parent": pl.String,  # ckpt_id of the starting checkpoint
    "path": pl.String,
    "content_hash": pl.String,
    "train_loss": pl.Float64,  # mean minibatch loss of the update that produced it
    "wall_seconds": pl.Float64,  # training time of the run up to this checkpoint
    "rl_start_step": pl.Int32,
}

def log_schema(outcomes: tuple[str, ...]) -> dict[str, pl.DataType]:
    """rl_log's columns; one `count_<outcome>` per outcome label of the task."""
    return {**_LOG_HEAD, **{f"count_{o}": pl.Int32 for o in outcomes}, **_LOG_TAIL}


_LOG_HEAD = {
    "rl_start_step": pl.Int32,
    "parent": pl.String,  # ckpt_id of the starting checkpoint
    "algorithm": pl.String,
    "update": pl.Int32,  # update k turns step k-1 into step k; rollout figures describe step k-1
    "reward_mean": pl.Float64,
    "reward_std": pl.Float64,
    "success_rate": pl.Float64,  # ppo: successful / finished episodes; grpo: correct completions
    "episodes_finished": pl.Int32,
}
_LOG_TAIL = {
    "truncations": pl.Int32,
    "loss": pl.Float64,
    "policy_loss": pl.Float64,
    "value_loss": pl.Float64,
    "clip_fraction": pl.Float64,
    "approx_kl": pl.Float64,
    "kl": pl.Float64,  # grpo with beta > 0: TRL's KL to the reference model
    "explained_variance": pl.Float64,
    "grad_norm": pl.Float64,  # before clipping, last optimizer step of the update
    "learning_rate": pl.Float64,
    "mean_response_tokens": pl.Float64,
    "wall_seconds": pl.Float64,  # since the run started (across resumes)
    **{f"adv_q{round(q * 100):02d}": pl.Float64 for q in QUANTILES},
    # [underflow (< -range), adv_hist_bins equal bins on [-range, +range], overflow (> +range)]
    "adv_hist": pl.List(pl.Int64),
}


def advantage_distribution(adv, bins: int, limit: float) -> dict:
    """Quantiles of the raw advantages and a fixed-bin histogram with two overflow bins:
    `adv_hist` = [underflow, bins..., overflow]; bin k covers [-R + kw, -R + (k+1)w), the
    last one closed at +R (numpy's convention), w = 2R / bins (training.md §3.5)."""
    a = np.asarray(adv, dtype=np.float64)
    qs = np.quantile(a, QUANTILES) if a.size else [None] * len(QUANTILES)
    inside, _ = np.histogram(a, bins=bins, range=(-limit, limit))
    hist = [int((a < -limit).sum()), *map(int, inside), int((a > limit).sum())]
    return {**{f"adv_q{round(q * 100):02d}": None if v is None else float(v) for q, v in zip(QUANTILES, qs)}, "adv_hist": hist}


def reward_fifths(rl_log: pl.DataFrame) -> tuple[float, float]:
    """Mean rollout reward of the first and the last fifth of one run's updates (at least one
    update each): the stability test of docs/toy-rl.md and the report's per-start table."""
    rows = rl_log.sort("update")
    fifth = max(1, rows.height // 5)
    return rows["reward_mean"].head(fifth).mean(), rows["reward_mean"].tail(fifth).mean()


def log_frame(rows: list[dict], outcomes: tuple[str, ...]) -> pl.DataFrame:
    schema = log_schema(outcomes)
    return pl.DataFrame([{k: r.get(k) for k in schema} for r in rows], schema=schema)


def checkpoints_frame(store: Store, run: Artifact, cfg: StudyConfig, start: dict) -> pl.DataFrame:
    """One row per listed update; update 0 is the starting checkpoint, registered, not copied."""
    rows = []
    for update in cfg.rl.save_steps:
        row = {"ckpt_id": f"rl-{start['step']}-{update}", "stage": "rl", "step": update, "parent": start["ckpt_id"], "rl_start_step": start["step"]}
        if update == 0:
            row.update(path=str(start["path"]), content_hash=start["content_hash"], train_loss=None, wall_seconds=0.0)
        else:
            art = run.step(update)
            m = store.manifest(art)
            row.update(path=str(art.path), content_hash=weights_hash(art.path), train_loss=m.get("train_loss"), wall_seconds=m.get("wall_seconds"))
        rows.append(row)
    return pl.DataFrame(rows, schema=CHECKPOINTS_SCHEMA)
