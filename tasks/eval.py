"""Stage `eval`: ID and OOD evaluation of checkpoints (training.md §7, GP §8, §9).

One artifact per (checkpoint, split, evaluation config), `<store>/eval/<key>/`, holding
- `eval_attempts`: one row per graded attempt (ATTEMPTS_SCHEMA);
- `eval_summary`: one row per checkpoint x split (GP §9 metrics, Wilson intervals,
  the reference-answer CE of §7.3 with `ce_target` naming the answer it scored, and the
  decoding that produced them).

The episode loop (`play`) is pure bookkeeping over any `generate` callable, so it is
tested with a scripted double; `tasks.lm.ModelGenerator` is the real one (batched, left
padded, KV cache, explicit decoding). `evaluate_model` takes an in-memory model so later stages
(editing) can evaluate a model they never wrote to disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import torch
from prefect import task

from rlheal.caching import Stage
from rlheal.config import StudyConfig
from rlheal.faults import maybe_fail
from rlheal.runners import gpu_lease
from rlheal.store import Artifact, Store, stable_hash, write_parquet
from tasks.chat import stop_token_ids
from tasks.data import ce_target
from tasks.lm import GLOBAL_RNG, Generate, Generation, Messages, ModelGenerator, is_oom, load_model, load_tokenizer, reference_ce
from tasks import benchmark
from tasks.benchmark import Benchmark, Episode, examples_of, other_mode, solved

STAGE = Stage("eval", version="2", tables=("eval_attempts", "eval_summary"))  # 2: the CE scores the trained target, column ce_target (issue 14 §7)
log = logging.getLogger("rlheal.eval")

_ATTEMPT = {
    "ckpt_id": pl.String,
    "split": pl.String,
    "hand_index": pl.Int64,  # the example's index
    "attempt": pl.Int32,  # 1-based
    "response": pl.String,  # raw decoded output, special tokens skipped
}
_GRADED = {
    "format_error": pl.Boolean,
    "reward": pl.Float64,  # configured verifier mode
    "reward_other_mode": pl.Float64,
    "outcome": pl.String,
    "reason": pl.String,
    "generated_tokens": pl.Int32,  # up to and including the stop token
    "hit_max_new_tokens": pl.Boolean,
}


def attempts_schema(bench: Benchmark) -> dict[str, pl.DataType]:
    """eval_attempts' columns: the attempt, the task's columns (`attempt_schema`), its grade."""
    return {**_ATTEMPT, **bench.attempt_schema, **_GRADED}


# ---------------------------------------------------------------------------- the episode loop


@dataclasses.dataclass
class Played:
    """Finished episodes, the generation behind every recorded step, and the batch size
    that was finally used (smaller than asked after an out-of-memory back-off)."""

    episodes: list[Episode]
    generations: list[list[Generation]]
    batch_size: int


def play(
    episodes: Sequence[Episode],
    generate: Generate,
    batch_size: int,
    length: Callable[[Messages], int] | None = None,
) -> Played:
    """Drive episodes (`Benchmark.episode`, GP §8) to the end with any generator.

    Each round, every unfinished episode answers its current conversation: the
    conversations are sorted by `length` (default: characters) so chunks of `batch_size`
    pad little, and each chunk is one `generate` call. On out-of-memory the chunk is
    halved and retried, and the smaller size is kept for the rest of the run (a sampled
    run that backed off differs from one that did not: the failed call drew random numbers).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    episodes = list(episodes)
    generations: list[list[Generation]] = [[] for _ in episodes]
    length = length or (lambda messages: sum(len(m["content"]) for m in messages))
    limit, rounds = batch_size, 0
    while todo := [i for i, ep in enumerate(episodes) if not ep.done]:
        rounds += 1
        conversations = {i: episodes[i].messages() for i in todo}
        order = sorted(todo, key=lambda i: (length(conversations[i]), i))
        log.info("eval round %d: %d episodes to answer", rounds, len(order))
        start = 0
        while start < len(order):
            chunk = order[start : start + limit]
            try:
                out = generate([conversations[i] for i in chunk])
            except Exception as err:
                if not is_oom(err):
                    raise
                if len(chunk) == 1:
                    raise RuntimeError("out of memory while generating for a single episode; lower eval.decoding.max_new_tokens or use a larger device") from err
                limit = len(chunk) // 2
                log.warning("out of memory at a batch of %d: retrying with %d", len(chunk), limit)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            if len(out) != len(chunk):
                raise RuntimeError(f"generate returned {len(out)} responses for {len(chunk)} conversations")
            for i, g in zip(chunk, out):
                episodes[i].record(g.text)
                generations[i].append(g)
            start += len(chunk)
    return Played(episodes, generations, limit)


# ---------------------------------------------------------------------------- tables


def attempts_table(bench: Benchmark, played: Played, ckpt_id: str, split: str, other: str) -> pl.DataFrame:
    schema = attempts_schema(bench)
    rows = {name: [] for name in schema}
    for ep, gens in zip(played.episodes, played.generations):
        others = bench.rescore(ep, other)
        for attempt, (s, g, r_other) in enumerate(zip(ep.scores, gens, others), start=1):
            values = {
                "ckpt_id": ckpt_id,
                "split": split,
                "hand_index": ep.example.index,
                "attempt": attempt,
                "response": g.text,
                **bench.score_columns(s),
                "format_error": s.format_error,
                "reward": s.reward,
                "reward_other_mode": r_other,
                "outcome": s.outcome,
                "reason": s.reason,
                "generated_tokens": g.tokens,
                "hit_max_new_tokens": g.hit_max_new_tokens,
            }
            for name, v in values.items():
                rows[name].append(v)
    return pl.DataFrame(rows, schema=schema)


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    """Wilson 95 % interval of k successes in n trials (GP §9); (nan, nan) when n == 0."""
    if n == 0:
        return (math.nan, math.nan)
    from scipy.stats import binomtest

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


def _wilson(k: str, n: str, name: str) -> list[pl.Expr]:
    ci = pl.struct(k, n).map_elements(
        lambda r: dict(zip(("low", "high"), wilson_interval(r[k], r[n]))),
        return_dtype=pl.Struct({"low": pl.Float64, "high": pl.Float64}),
    )
    return [ci.struct.field("low").alias(f"{name}_ci_low"), ci.struct.field("high").alias(f"{name}_ci_high")]


def summarize(bench: Benchmark, attempts: pl.DataFrame) -> pl.DataFrame:
    """GP §9 metrics per (ckpt_id, split) from `eval_attempts` rows, and the task's own
    (`Benchmark.summary_metrics`)."""
    by = ["ckpt_id", "split"]
    correct = solved(bench)
    first = pl.col("attempt") == 1
    hands = (
        attempts.group_by(*by, "hand_index")
        .agg(success=correct.any(), first_success=(correct & first).any(), to_success=pl.col("attempt").filter(correct).min())
        .group_by(by)
        .agg(
            n=pl.len().cast(pl.Int32),
            k=pl.col("success").sum().cast(pl.Int32),
            k_first=pl.col("first_success").sum().cast(pl.Int32),
            mean_attempts_to_success=pl.col("to_success").cast(pl.Float64).mean(),
        )
    )
    counts = attempts.group_by(by).agg(
        attempts=pl.len().cast(pl.Int32),
        format_error_rate=pl.col("format_error").mean(),
        first_attempt_format_error_rate=pl.col("format_error").filter(first).mean(),
        generated_tokens=pl.col("generated_tokens").sum().cast(pl.Int64),
        *[(pl.col("outcome") == o).sum().alias(f"count_{o}") for o in bench.outcomes],
    )
    n, k, a = pl.col("n"), pl.col("k"), pl.col("attempts")
    extra = bench.summary_metrics(n, k, a)
    return (
        hands.join(counts, on=by)
        .with_columns(accuracy=k / n, first_attempt_accuracy=pl.col("k_first") / n)
        .with_columns(
            *_wilson("k", "n", "accuracy"),
            *_wilson("k_first", "n", "first_attempt_accuracy"),
            *[(pl.col(f"count_{o}") / a).alias(f"rate_{o}") for o in bench.outcomes],
            **extra,
        )
        .select(
            *by, "n", "k", "accuracy", "accuracy_ci_low", "accuracy_ci_high",
            "first_attempt_accuracy", "first_attempt_accuracy_ci_low", "first_attempt_accuracy_ci_high",
            "mean_attempts_to_success", "attempts", "format_error_rate", "first_attempt_format_error_rate",
            *[f"rate_{o}" for o in bench.outcomes], *extra, "generated_tokens",
        )
        .sort(by)
    )  # fmt: skip


def ce_by_split(summary: pl.DataFrame) -> pl.DataFrame:
    """`ce_id` / `ce_ood` side by side, one row per checkpoint and evaluation config."""
    index = ["ckpt_id", "config_hash"]
    wide = summary.pivot(on="split", index=index, values="ce", aggregate_function="first")
    return wide.rename({s: f"ce_{s}" for s in ("id", "ood") if s in wide.columns})


# ---------------------------------------------------------------------------- evaluation


@contextlib.contextmanager
def seeded(decoding: dict, device: torch.device):
    """Sampled evaluation: one seed per evaluation call (training.md §6), holding the
    process's RNG lock and giving the caller's random state back after. Greedy decoding
    draws no random number, so it leaves the global stream alone: a fork and restore there
    would rewind the stream of an RL run or SFT sampling in another thread (issue 18: they
    now run at the same time in one process)."""
    if not decoding["do_sample"]:
        yield
        return
    with GLOBAL_RNG, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(decoding["seed"])
        yield


@torch.no_grad()
def evaluate_model(model, tok, hands_table: pl.DataFrame, cfg: StudyConfig, ckpt: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Evaluate an in-memory model on one split's examples; returns (eval_attempts, eval_summary)."""
    splits = hands_table["split"].unique().to_list()
    if len(splits) != 1:
        raise ValueError(f"evaluate_model needs the hands of one split; got splits {splits}")
    split = splits[0]
    bench = benchmark.of(cfg)
    target = ce_target(hands_table, cfg)
    started = time.perf_counter()
    decoding = cfg.eval.decoding.resolved()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = ModelGenerator(model, tok, decoding, cfg.chat.date_string)
    with seeded(decoding, device):
        episodes = [bench.episode(e, cfg.verifier.mode, cfg.verifier.verify_iter) for e in examples_of(bench, hands_table)]
        played = play(episodes, generator, cfg.eval.batch_size, generator.length)
    attempts = attempts_table(bench, played, ckpt["ckpt_id"], split, other_mode(bench, cfg.verifier.mode))
    ce = reference_ce(model, tok, hands_table, cfg.eval.ce_hands, cfg.chat.date_string, batch_size=played.batch_size)
    model.train(was_training)
    meta = {
        "stage": pl.lit(ckpt.get("stage"), pl.String),
        "step": pl.lit(ckpt.get("step"), pl.Int32),
        "content_hash": pl.lit(ckpt.get("content_hash"), pl.String),
        "ce": pl.lit(ce, pl.Float64),
        "ce_target": pl.lit(target, pl.String),
        "eval_set_hash": pl.lit(hands_table["eval_set_hash"][0], pl.String),
        "config_hash": pl.lit(config_hash(cfg), pl.String),
        "preset": pl.lit(decoding["preset"], pl.String),
        "do_sample": pl.lit(decoding["do_sample"], pl.Boolean),
        "temperature": pl.lit(decoding["temperature"], pl.Float64),
        "top_p": pl.lit(decoding["top_p"], pl.Float64),
        "top_k": pl.lit(decoding["top_k"], pl.Int32),
        "repetition_penalty": pl.lit(decoding["repetition_penalty"], pl.Float64),
        "max_new_tokens": pl.lit(decoding["max_new_tokens"], pl.Int32),
        "seed": pl.lit(decoding["seed"], pl.Int64),
        "verifier_mode": pl.lit(cfg.verifier.mode, pl.String),
        "verify_iter": pl.lit(cfg.verifier.verify_iter, pl.Int32),
        "batch_size": pl.lit(cfg.eval.batch_size, pl.Int32),
        "batch_size_used": pl.lit(played.batch_size, pl.Int32),
        "n_params": pl.lit(sum(p.numel() for p in model.parameters()), pl.Int64),
        "device": pl.lit(str(device), pl.String),
        "seconds": pl.lit(time.perf_counter() - started, pl.Float64),
    }
    summary = summarize(bench, attempts).with_columns(**meta)
    front = ["ckpt_id", "stage", "step", "split"]
    return attempts, summary.select(*front, pl.exclude(front))


# ---------------------------------------------------------------------------- teacher-forced CE


# ---------------------------------------------------------------------------- store and Prefect


def decoding_key(cfg: StudyConfig) -> dict[str, Any]:
    """The decoding values that can change the outputs. Greedy output does not depend on
    the seed, the sampling knobs or the batch size; sampled output depends on all three
    (the batch composition decides which random numbers each row gets; training.md §6)."""
    d = cfg.eval.decoding.resolved()
    if not d["do_sample"]:
        return {k: d[k] for k in ("preset", "do_sample", "repetition_penalty", "max_new_tokens")}
    return {**d, "batch_size": cfg.eval.batch_size}


def config_hash(cfg: StudyConfig) -> str:
    """Hash of the evaluation settings shared by both splits of a checkpoint."""
    return stable_hash({"decoding": decoding_key(cfg), "verifier": cfg.verifier.model_dump(), "ce_hands": cfg.eval.ce_hands, "ce_target": cfg.data.answer, "date_string": cfg.chat.date_string})


def key_config(cfg: StudyConfig, ckpt: dict, split: str, eval_set_hash: str) -> dict[str, Any]:
    # The labels are in the key because they are written into the tables.
    return {
        "task": cfg.task,
        "ckpt": {k: ckpt.get(k) for k in ("ckpt_id", "stage", "step", "content_hash")},
        "split": split,
        "eval_set_hash": eval_set_hash,
        "decoding": decoding_key(cfg),
        "verifier": cfg.verifier.model_dump(),
        "ce_hands": cfg.eval.ce_hands,
        # the eval set hash covers the cards, not the answer the CE scores
        "ce_target": cfg.data.answer,
        "date_string": cfg.chat.date_string,
    }


def _hands(data_path: Path, split: str) -> pl.DataFrame:
    path = Path(data_path) / f"eval_set_{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evaluation table for split {split!r} (is {data_path} a data artifact?)")
    return pl.read_parquet(path)


def artifact(store: Store, cfg: StudyConfig, ckpt: dict, split: str, data_path: Path) -> Artifact:
    set_hash = pl.read_parquet(Path(data_path) / f"eval_set_{split}.parquet", columns=["eval_set_hash"])["eval_set_hash"][0]
    return STAGE.artifact(store, key_config(cfg, ckpt, split, set_hash))


def run(store: Store, cfg: StudyConfig, ckpt: dict, split: str, data_path: Path) -> Path:
    """Evaluate a stored checkpoint on one split; plain function, no Prefect needed."""
    return make(artifact(store, cfg, ckpt, split, data_path), cfg, ckpt, split, Path(data_path))


def _run_name(parameters: dict) -> str:
    return f"eval {describe(parameters['ckpt'])} {parameters['split']}"


@task(name=STAGE.name, task_run_name=_run_name)
def stage(artifact: Artifact, cfg: StudyConfig, ckpt: dict, split: str, data: str) -> str:
    maybe_fail("eval")
    with gpu_lease(cfg.runner):
        return str(make(artifact, cfg, ckpt, split, Path(data)))


def make(art: Artifact, cfg: StudyConfig, ckpt: dict, split: str, data_path: Path) -> Path:
    """Evaluation `art` of a stored checkpoint (`ckpt`, a `checkpoints` row) on one split of
    the data artifact `data_path`: found sealed, or run."""
    hands = _hands(data_path, split)

    def build(tmp: Path) -> dict:
        cuda = torch.cuda.is_available()
        tok = load_tokenizer(ckpt["path"], cfg.model.trust_remote_code)
        model = load_model(ckpt["path"], torch.bfloat16 if cuda else torch.float32, "cuda" if cuda else "cpu", cfg.model.trust_remote_code)
        attempts, summary = evaluate_model(model, tok, hands, cfg, ckpt)
        write_parquet(attempts, tmp / "eval_attempts.parquet")
        write_parquet(summary, tmp / "eval_summary.parquet")
        s = summary.row(0, named=True)
        log.info("eval %s %s: accuracy %d/%d, first attempt %.3f, ce %.4f, %.1f s", ckpt["ckpt_id"], split, s["k"], s["n"], s["first_attempt_accuracy"], s["ce"], s["seconds"])
        return {"accuracy": s["accuracy"], "batch_size_used": s["batch_size_used"], "stop_token_ids": stop_token_ids(tok)}

    return STAGE.build(art, build)


def collect(paths: Sequence[str | Path]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(eval_attempts, eval_summary) of many eval artifacts; the summary gains `ce_id` and
    `ce_ood` of its checkpoint (null where that split was not evaluated)."""
    attempts = pl.concat([pl.read_parquet(Path(p) / "eval_attempts.parquet") for p in paths], how="vertical")
    summary = pl.concat([pl.read_parquet(Path(p) / "eval_summary.parquet") for p in paths], how="vertical")
    wide = ce_by_split(summary)
    for s in ("id", "ood"):
        if f"ce_{s}" not in wide.columns:
            wide = wide.with_columns(pl.lit(None, pl.Float64).alias(f"ce_{s}"))
    return attempts, summary.join(wide, on=["ckpt_id", "config_hash"], how="left")


def describe(ckpt: dict) -> str:
    """A checkpoint as the Prefect UI names it: `base`, `sft step=80`, `rl from=80 upd=20`."""
    if ckpt.get("stage") == "sft":
        return f"sft step={ckpt['step']}"
    if ckpt.get("stage") == "rl":
        return f"rl from={ckpt.get('rl_start_step')} upd={ckpt['step']}"
    return str(ckpt.get("ckpt_id", ckpt.get("stage")))


def collect_artifact(store: Store, paths: Sequence[str | Path]) -> Artifact:
    """The study-wide tables: one artifact keyed by the per-(checkpoint, split) artifacts."""
    return STAGE.artifact(store, {"collect": sorted(Store.from_path(p).key for p in paths)})


@task(name=f"{STAGE.name}-tables", task_run_name="eval tables")
def collect_stage(artifact: Artifact, paths: list[str]) -> str:
    """The study-wide `eval_attempts` and `eval_summary`, gathered from every evaluation."""

    def build(tmp: Path) -> dict:
        attempts, summary = collect(paths)
        write_parquet(attempts, tmp / "eval_attempts.parquet")
        write_parquet(summary, tmp / "eval_summary.parquet")
        return {"rows": {"eval_attempts": attempts.height, "eval_summary": summary.height}}

    return str(STAGE.build(artifact, build))
