"""Stage `data`: SFT rows and the fixed evaluation hands, as Parquet (GP §2, §5).

Tables (one artifact, `<store>/data/<key>/`):
- `sft_train`: one row per training hand, in index order, in TRL's conversational
  prompt/completion format (`prompt`, `completion` are message lists) plus hand fields.
- `eval_id`, `eval_ood`: the evaluation hands with their dealt reference answers
  (`answer`), the answer SFT would train on for the hand (`target`, what the teacher-forced
  CE of training.md §7.3 scores) and which of the two that is (`ce_target`, = `data.answer`),
  and the evaluation-set hash (GP §2).
The rows are model independent: the SFT stage applies each model's chat template.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import polars as pl
from prefect import task

from rlheal.caching import Stage
from rlheal.config import StudyConfig
from rlheal.faults import maybe_fail
from rlheal.store import Artifact, Store, write_parquet
from tasks.generalpoints import (
    SPLITS,
    Hand,
    deal,
    failure_message,
    overlap_key,
    reference_answer,
    render_prompt,
    wrong_attempt,
)

STAGE = Stage("data", version="2", tables=("sft_train", "eval_id", "eval_ood"))  # 2: eval tables carry the trained target (issue 14 §7)
log = logging.getLogger("rlheal.data")


class OverlapError(AssertionError):
    """Training and evaluation hands overlap: a bug, never a user error."""


# ---------------------------------------------------------------------------- hands


def eval_hands(seed: int, size: int) -> dict[str, list[Hand]]:
    """The fixed evaluation lists: `deal(split, seed, i)` for i < size (GP §2)."""
    return {split: [deal(split, seed, i) for i in range(size)] for split in SPLITS}


def eval_set_hash(hands: dict[str, list[Hand]]) -> str:
    """SHA-256 of `[[split, index, cards], ...]`, ID hands then OOD hands (GP §2)."""
    items = [[h.split, h.index, list(h.cards)] for split in SPLITS for h in hands[split]]
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()


def training_hands(seed: int, exclude: set, overlap: str) -> Iterator[Hand]:
    """`deal("id", seed, i)` for i = 0, 1, ..., skipping (not re-dealing) any hand whose
    overlap key is in `exclude`, so row i is always deal(..., i) or absent (GP §2)."""
    i = 0
    while True:
        hand = deal("id", seed, i)
        if overlap_key(hand, overlap) not in exclude:
            yield hand
        i += 1


# ---------------------------------------------------------------------------- tables


def trained_hand(hand: Hand, answer: str) -> Hand:
    """The hand with the formula SFT trains on as its reference (`data.answer`): the dealt
    reference solution (GP §2 step 4) or the first canonical solution."""
    return dataclasses.replace(hand, reference=hand.solutions[0]) if answer == "first" else hand


def _sft_row(hand: Hand, cfg: StudyConfig) -> dict:
    hand = trained_hand(hand, cfg.data.answer)
    prompt = [{"role": "user", "content": render_prompt(hand)}]
    wrong = wrong_attempt(hand, cfg.data.train_seed, hand.index, cfg.data.multi_turn_fraction, cfg.verifier.mode)
    if wrong is not None:
        text, reason = wrong
        prompt += [{"role": "assistant", "content": text}, {"role": "user", "content": failure_message(reason)}]
    return {
        "index": hand.index,
        "cards": list(hand.cards),
        "numbers": list(hand.numbers),
        "formula": hand.reference,
        "multi_turn": wrong is not None,
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": reference_answer(hand)}],
    }


def sft_table(cfg: StudyConfig, exclude: set) -> tuple[pl.DataFrame, int]:
    """The first `train_size` training hands not in `exclude`; returns (table, skipped)."""
    rows, last = [], -1
    for hand in training_hands(cfg.data.train_seed, exclude, cfg.data.overlap):
        rows.append(_sft_row(hand, cfg))
        last = hand.index
        if len(rows) == cfg.data.train_size:
            break
    return pl.DataFrame(rows), last + 1 - len(rows)


def eval_table(hands: list[Hand], set_hash: str, answer: str = "reference") -> pl.DataFrame:
    """One split's evaluation hands. `target` is the completion text an SFT row of the hand
    would carry (`_sft_row`), so the reference CE measures the answer SFT is trained on."""
    return pl.DataFrame(
        {
            "split": [h.split for h in hands],
            "index": [h.index for h in hands],
            "cards": [list(h.cards) for h in hands],
            "numbers": [list(h.numbers) for h in hands],
            "n_solutions": [len(h.solutions) for h in hands],
            "formula": [h.reference for h in hands],
            "prompt": [render_prompt(h) for h in hands],
            "answer": [reference_answer(h) for h in hands],
            "target": [reference_answer(trained_hand(h, answer)) for h in hands],
            "ce_target": [answer] * len(hands),
            "eval_set_hash": [set_hash] * len(hands),
        },
        schema_overrides={"index": pl.Int64, "n_solutions": pl.Int32},
    )


def ce_target(table: pl.DataFrame, cfg: StudyConfig) -> str:
    """Which answer the table's `target` column holds ("reference" or "first", `data.answer`);
    the evaluation key takes it from the config, so a table of another data config is refused."""
    target = table["ce_target"][0] if "ce_target" in table.columns and table.height else None
    if target != cfg.data.answer:
        raise ValueError(f"the hands table's CE target is {target!r} but data.answer is {cfg.data.answer!r}: build the data stage again")
    return target


def check_disjoint(train: pl.DataFrame, hands: dict[str, list[Hand]], overlap: str) -> None:
    """Checked, not assumed: no training hand equals an evaluation hand."""
    evaluation = {overlap_key(h, overlap) for split in SPLITS for h in hands[split]}
    for idx, cards in zip(train["index"], train["cards"]):
        cards = cards.to_list()
        key = ("id", tuple(sorted(cards)) if overlap == "multiset" else tuple(cards))
        if key in evaluation:
            raise OverlapError(f"training hand {idx} {cards} equals an evaluation hand ({overlap})")


def build(out: Path, cfg: StudyConfig) -> dict:
    """Write the three tables into `out`; returns manifest extras."""
    hands = eval_hands(cfg.data.eval_seed, cfg.data.eval_size)
    set_hash = eval_set_hash(hands)
    exclude = {overlap_key(h, cfg.data.overlap) for split in SPLITS for h in hands[split]}
    train, skipped = sft_table(cfg, exclude)
    check_disjoint(train, hands, cfg.data.overlap)
    log.info("sft_train: %d rows, %d training indices skipped as evaluation hands", train.height, skipped)
    write_parquet(train, out / "sft_train.parquet")
    for split in SPLITS:
        write_parquet(eval_table(hands[split], set_hash, cfg.data.answer), out / f"eval_{split}.parquet")
    return {"eval_set_hash": set_hash, "rows": {"sft_train": train.height, **{f"eval_{s}": len(hands[s]) for s in SPLITS}}, "skipped_overlap": skipped}


def key_config(cfg: StudyConfig) -> dict:
    """Everything the data tables depend on (and nothing else: no model, no store)."""
    return {"data": cfg.data.model_dump(), "verifier_mode": cfg.verifier.mode}


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
