"""Stage `data`: SFT rows and the fixed evaluation examples, as Parquet (GP §2, §5).

Tables (one artifact, `<store>/data/<key>/`):
- `sft_train`: one row per training example, in index order, in TRL's conversational
  prompt/completion format (`prompt`, `completion` are message lists) plus the task's fields.
- `eval_set_id`, `eval_set_ood`: the evaluation examples with their dealt reference answers
  (`answer`), the answer SFT would train on for the hand (`target`, what the teacher-forced
  CE of training.md §7.3 scores) and which of the two that is (`ce_target`, = `data.answer`),
  and the evaluation-set hash (GP §2).
The task's `Benchmark` (tasks/benchmark.py) deals the examples and writes their rows.
The rows are model independent: the SFT stage applies each model's chat template.
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
from prefect import task

from rlheal.caching import Stage
from rlheal.config import StudyConfig
from rlheal.faults import maybe_fail
from rlheal.store import Artifact, Store, write_parquet
from tasks import benchmark
from tasks.benchmark import Benchmark, eval_examples, eval_set_hash, training_stream

STAGE = Stage("data", version="2", tables=("sft_train", "eval_set_id", "eval_set_ood"))  # 2: eval tables carry the trained target (issue 14 §7)
log = logging.getLogger("rlheal.data")


class OverlapError(AssertionError):
    """Training and evaluation examples overlap: a bug, never a user error."""


def sft_table(bench: Benchmark, cfg: StudyConfig, exclude: set) -> tuple[pl.DataFrame, int, list]:
    """The first `train_size` rows of the training examples not in `exclude` (an example may
    give several rows: `Benchmark.sft_rows`); returns (table, skipped, examples)."""
    examples, rows = [], []
    for example in training_stream(bench, cfg.data.train_seed, exclude, cfg.data.overlap):
        examples.append(example)
        rows += bench.sft_rows(example, cfg)
        if len(rows) >= cfg.data.train_size:
            break
    last = examples[-1].index if examples else -1
    return pl.DataFrame(rows[: cfg.data.train_size]), last + 1 - len(examples), examples


def eval_table(bench: Benchmark, examples: list, set_hash: str, cfg: StudyConfig) -> pl.DataFrame:
    """One split's evaluation examples (`Benchmark.eval_row`), with the answer the CE
    target is (`ce_target`, = `data.answer`) and the evaluation-set hash."""
    rows = [bench.eval_row(e, cfg) | {"ce_target": cfg.data.answer, "eval_set_hash": set_hash} for e in examples]
    return pl.DataFrame(rows, schema_overrides={"index": pl.Int64, **bench.column_types})


def ce_target(table: pl.DataFrame, cfg: StudyConfig) -> str:
    """Which answer the table's `target` column holds ("reference" or "first", `data.answer`);
    the evaluation key takes it from the config, so a table of another data config is refused."""
    target = table["ce_target"][0] if "ce_target" in table.columns and table.height else None
    if target != cfg.data.answer:
        raise ValueError(f"the evaluation table's CE target is {target!r} but data.answer is {cfg.data.answer!r}: build the data stage again")
    return target


def check_disjoint(bench: Benchmark, train: list, evaluation: set, overlap: str) -> None:
    """Checked, not assumed: no training example equals an evaluation example."""
    for example in train:
        if bench.overlap_key(example, overlap) in evaluation:
            raise OverlapError(f"training example {example.index} equals an evaluation example ({overlap})")


def build(out: Path, cfg: StudyConfig) -> dict:
    """Write the training table and one evaluation table per split into `out`; returns manifest extras."""
    bench = benchmark.of(cfg)
    examples = eval_examples(bench, cfg.data.eval_seed, cfg.data.eval_size)
    set_hash = eval_set_hash(bench, examples)
    exclude = {bench.overlap_key(e, cfg.data.overlap) for split in bench.splits for e in examples[split]}
    train, skipped, train_examples = sft_table(bench, cfg, exclude)
    check_disjoint(bench, train_examples, exclude, cfg.data.overlap)
    log.info("sft_train: %d rows, %d training indices skipped as evaluation examples", train.height, skipped)
    write_parquet(train, out / "sft_train.parquet")
    for split in bench.splits:
        write_parquet(eval_table(bench, examples[split], set_hash, cfg), out / f"eval_set_{split}.parquet")
    return {"eval_set_hash": set_hash, "rows": {"sft_train": train.height, **{f"eval_set_{s}": len(examples[s]) for s in bench.splits}}, "skipped_overlap": skipped}


def key_config(cfg: StudyConfig) -> dict:
    """Everything the data tables depend on (and nothing else: no model, no store)."""
    return {"task": cfg.task, "data": cfg.data.model_dump(), "verifier_mode": cfg.verifier.mode}


def artifact(store: Store, cfg: StudyConfig) -> Artifact:
    return STAGE.artifact(store, key_config(cfg))


def make(art: Artifact, cfg: StudyConfig) -> Path:
    """The data artifact `art`: found sealed, or built."""
    return STAGE.build(art, lambda tmp: build(tmp, cfg))


def run(store: Store, cfg: StudyConfig) -> Path:
    """Build (or find) the data artifact; plain function, no Prefect needed."""
    return make(artifact(store, cfg), cfg)


@task(name=STAGE.name, task_run_name="data")
def stage(artifact: Artifact, cfg: StudyConfig) -> str:
    maybe_fail("data")
    return str(make(artifact, cfg))
