"""The benchmark interface: everything task-specific a stage calls (issue 16 §4).

A study's config names its task (`task: generalpoints`); every stage asks `of(cfg)` for
that task's `Benchmark` and never imports a task package itself. The stages own the
machinery (training, decoding, checkpoints, tables, SVD, editing, verdicts); the task owns
what the model reads and how its answers are judged.

To add a task (for the next reader: V-IRL navigation):

1. Write `tasks/<name>/benchmark.py` with a class that has every member of `Benchmark`
   below, and add its import path to `TASKS`; add the name to `StudyConfig.task`'s
   `Literal` in rlheal/config.py. A config section named as the task (`virl:`) is passed
   to the class's constructor as keyword arguments.
2. An *example* is one unit of evaluation, what GeneralPoints calls a hand and V-IRL a
   route: a frozen dataclass with at least `split` and `index` (its position in the stream
   `deal` made it from; None when it was built by hand). Dealing is a pure function of
   (split, seed, index), never of a global RNG: the data stage, both RL algorithms and a
   resume get the same example for the same (split, seed, index).
3. The splits are `("id", "ood")`: training deals only from `id`; the report and its
   verdicts compare the two by these names, and the SVD roles pick checkpoints by `ood`. The verifier modes are
   `("exact", "reference")`, `verifier.mode`'s two choices: `exact` is the task's own
   definition, `reference` reproduces the authors' code where it differs (GeneralPoints:
   float arithmetic); eval_attempts records the reward under both (`rescore`).
4. An *episode* is the conversation of one example (`episode`): it starts with the prompt
   as the user turn; each generated response is `record`-ed, graded into a `Score`, and
   the episode appends the task's feedback (a failure message, the next observation) as
   the next user turn until it is `done`. Evaluation drives it with `rl=False`; PPO's
   rollouts drive the same object with `rl=True`. The episode alone decides when it ends:
   PPO treats an ended episode as terminal (d_t = 1) unless its last Score is `truncated`
   (cut at a step limit: GeneralPoints' ungraded last step, GP §8), and counts
   `Episode.success` in its success rate.
5. A `Score` has at least `reward` (float), `outcome` (one of `outcomes`), `reason`
   (text), `format_error` (bool) and `truncated` (bool). An example is *solved* when one of
   its graded attempts `solves` it (the same rule over eval_attempts rows: `solved_rows`):
   GeneralPoints' +5; V-IRL's correct `stop()` at the destination (outcome `arrived`),
   not each right step, whose share belongs in `summary_metrics`. Accuracy is the share
   of examples solved; `first_attempt_accuracy` and `mean_attempts_to_success` count
   attempts of the whole episode.
6. Two stages see only the first turn: GRPO trains single-turn, on `episode(...).messages()`
   before any response, scored with `score(response, example, mode)`; and the eval
   stage's teacher-forced CE scores `eval_row`'s `target` after its `prompt`. `score` grades
   a response to that first turn; a multi-step task scores a later step through its
   episode, where the state is (and `rescore` through a replay).
7. The tables keep one row layout for every task: the stages write the common columns and
   put the task's own columns where `sft_rows`, `eval_row` and `score_columns` say (with
   their polars types in `attempt_schema` and `column_types`).
8. The tiny builtin model's word-level vocabulary is built from `phrases()`: every fixed
   chunk of the task's text, so each prompt and each answer round-trips exactly; its
   pretraining corpus is `corpus(cfg)`.

Nothing here is GeneralPoints-specific; `tasks/generalpoints/benchmark.py` is the worked
example, and its tests (tests/test_benchmark.py) are the checklist a new task passes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, Protocol

import polars as pl

from rlheal.config import StudyConfig

Messages = list[dict[str, str]]

# task name -> "module:Class"; imported on first use, so only the chosen task is loaded.
TASKS = {"generalpoints": "tasks.generalpoints.benchmark:GeneralPoints", "virl": "tasks.virl.benchmark:Virl"}


class Score(Protocol):
    reward: float
    outcome: str
    reason: str
    format_error: bool
    truncated: bool


class Episode(Protocol):
    example: Any
    scores: list  # the recorded Scores, in order
    responses: list[str]  # the recorded responses, in order: a PPO resume replays them
    done: bool
    success: bool
    truncated: bool

    def messages(self) -> Messages:
        """The conversation so far; while not done, it ends with the user turn to answer."""

    def record(self, response: str) -> Score:
        """Grade one generated response and extend the conversation."""


class Benchmark(Protocol):
    name: str
    splits: tuple[str, ...]  # ("id", "ood"); training deals only from "id" (point 3)
    outcomes: tuple[str, ...]  # outcome labels, in the order tables list their columns
    modes: tuple[str, ...]  # ("exact", "reference"), `verifier.mode`'s choices (point 3)
    attempt_schema: dict[str, pl.DataType]  # the task's columns of eval_attempts, in order
    column_types: dict[str, pl.DataType]  # types of eval_set_<split> columns polars would infer otherwise
    corpus_version: str  # version of the pretraining corpus code, in the pretrain key
    report_metrics: tuple[str, ...]  # summary_metrics columns the report's accuracy table shows
    action_key: str  # the answer's key that PPO's sequence score weights fully, the text before it by thought_coef

    def check(self, cfg: StudyConfig) -> None:
        """Refuse a config the task cannot run (ConfigError: the field named), before
        anything is written (the pre-run checks call it)."""

    def deal(self, split: str, seed: int, index: int) -> Any:
        """Example `index` of stream `seed` under `split`."""

    def overlap_key(self, example: Any, overlap: str) -> Hashable:
        """When a training example 'equals' an evaluation example (`data.overlap`)."""

    def identity(self, example: Any) -> Any:
        """JSON-able content of an example that the evaluation-set hash covers."""

    def sft_rows(self, example: Any, cfg: StudyConfig) -> list[dict]:
        """The `sft_train` rows of one example (GeneralPoints: one; V-IRL: one per step):
        `index`, the task's columns, `prompt` and `completion` (TRL conversational message
        lists; the completion is the trained target)."""

    def eval_row(self, example: Any, cfg: StudyConfig) -> dict:
        """One `eval_set_<split>` row: `split`, `index`, the task's columns, `prompt`, `answer`
        (the dealt reference answer) and `target` (the text SFT would train on for it)."""

    def from_row(self, row: dict) -> Any:
        """The example of an `eval_set_<split>` row."""

    def episode(self, example: Any, mode: str, verify_iter: int, rl: bool = False) -> Episode:
        """A new episode of `example`: at most `verify_iter` graded attempts (`verifier.verify_iter`),
        graded under `mode`; `rl=True` for PPO's rollouts (point 4)."""

    def score(self, response: str, example: Any, mode: str) -> Score:
        """Grade a response to the example's first turn (point 6)."""

    def solves(self, score: Score) -> bool:
        """Whether a graded attempt solves its example (point 5)."""

    def solved_rows(self) -> pl.Expr:
        """`solves` over eval_attempts rows (columns `reward`, `outcome`)."""

    def rescore(self, episode: Episode, mode: str) -> list[float]:
        """The rewards of the episode's recorded attempts under another verifier mode, in
        order (eval_attempts' `reward_other_mode`): each against the state it answered."""

    def score_columns(self, score: Score) -> dict:
        """The task's eval_attempts columns of one graded attempt (`attempt_schema`)."""

    def summary_metrics(self, n: pl.Expr, k: pl.Expr, attempts: pl.Expr) -> dict[str, pl.Expr]:
        """Extra eval_summary columns from the per-split counts: n examples, k solved,
        `attempts` graded attempts, and the `count_<outcome>` columns."""

    def phrases(self) -> list[str]:
        """Fixed chunks of the task's text: the tiny model's added tokens."""

    def corpus(self, cfg: StudyConfig) -> pl.DataFrame:
        """The tiny base's pretraining corpus (`prompt`, `answer` text columns; docs/pretrain.md)."""

    def report_columns(self, tables: dict[str, pl.DataFrame]) -> pl.DataFrame | None:
        """Task metrics per (ckpt_id, split) the report shows beside accuracy, or None."""

    def paper_reference(self) -> Any:
        """The paper's OOD curve for this task, or None: `.curve` (rows `stage`, `sft_step`,
        `accuracy_pct`), `.window` (the SFT steps RL recovered from), `.se_pp` (the sampling
        error of one of its points, percentage points), `.label`."""


@functools.cache
def get(name: str, options: str = "{}") -> Benchmark:
    """The benchmark called `name` (one of TASKS), built with the task's config section
    (`options`, its JSON; a task without one takes none)."""
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; one of {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    kwargs = json.loads(options)
    return getattr(importlib.import_module(module), cls)(**kwargs)


def of(cfg: StudyConfig) -> Benchmark:
    """The benchmark a study's config names (`task`), with its section (`virl:` for virl)."""
    section = getattr(cfg, cfg.task, None)
    return get(cfg.task, json.dumps(section.model_dump(), sort_keys=True) if section is not None else "{}")


# ---------------------------------------------------------------------------- what stages share


def eval_examples(bench: Benchmark, seed: int, size: int) -> dict[str, list]:
    """The fixed evaluation lists: `deal(split, seed, i)` for i < size, every split (GP §2)."""
    return {split: [bench.deal(split, seed, i) for i in range(size)] for split in bench.splits}


def eval_set_hash(bench: Benchmark, examples: dict[str, list]) -> str:
    """SHA-256 of `[[split, index, identity], ...]`, split by split in `splits` order (GP §2)."""
    items = [[e.split, e.index, bench.identity(e)] for split in bench.splits for e in examples[split]]
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()


def evaluation_keys(bench: Benchmark, cfg: StudyConfig) -> set:
    """Overlap keys of every evaluation example: training streams skip these (GP §2)."""
    examples = eval_examples(bench, cfg.data.eval_seed, cfg.data.eval_size)
    return {bench.overlap_key(e, cfg.data.overlap) for split in bench.splits for e in examples[split]}


def training_stream(bench: Benchmark, seed: int, exclude: set, overlap: str, start: int = 0) -> Iterator:
    """`deal(splits[0], seed, i)` for i = start, start + 1, ..., skipping (not re-dealing)
    any example whose overlap key is in `exclude`, so row i is deal(..., i) or absent (GP §2)."""
    i = start
    while True:
        example = bench.deal(bench.splits[0], seed, i)
        if bench.overlap_key(example, overlap) not in exclude:
            yield example
        i += 1


def other_mode(bench: Benchmark, mode: str) -> str:
    """The verifier mode that is not `mode` (eval_attempts records both rewards)."""
    return next(m for m in bench.modes if m != mode)


def solved(bench: Benchmark) -> pl.Expr:
    """True where a graded attempt (a row of eval_attempts) solved its example."""
    return bench.solved_rows()


def examples_of(bench: Benchmark, table: pl.DataFrame) -> Sequence:
    """The examples of an `eval_set_<split>` table."""
    return [bench.from_row(row) for row in table.iter_rows(named=True)]
