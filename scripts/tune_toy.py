"""One toy-tuning experiment: data -> model -> pretrain -> sft -> eval of every SFT
checkpoint, driving the stage functions directly on a scratch store (no Prefect), then
one table per SFT step (issue 11 §3):

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python scripts/tune_toy.py configs/toy.yaml \
        --store /tmp/tune --set sft.learning_rate=3e-4 --set pretrain.steps=2000

Columns: ID / OOD accuracy within the episode's attempts (k of n hands), OOD first-attempt
accuracy, `any1` = first attempts whose formula (in either format) is correct,
`ood_num` = share of OOD attempts whose "number" list equals the hand's OOD
values (first attempts: `ood_num1`), first-attempt format-error rates, and the reference
teacher-forced CE of both splits (training.md §7.3). The SFT log's CE (every
sft.ce_every steps) is printed as well. Stages are cached in the store, so experiments
that change only SFT reuse the pretrained base. Select nothing on these OOD numbers
beyond what the study itself does (the choice of B).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import polars as pl
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlheal.config import parse_config  # noqa: E402
from rlheal.store import Store  # noqa: E402
from tasks import data, eval, model, pretrain, sft  # noqa: E402
from tasks.generalpoints import make_hand, score  # noqa: E402


def override(tree: dict, dotted: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into a nested dict."""
    path, _, value = dotted.partition("=")
    *parents, leaf = path.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)


def number_field(responses: pl.Series) -> pl.Series:
    """The first integer list written after `"number": [` (answer block) or `number: [` (the
    pretraining corpus's plain format) in each response; None if absent."""
    out = []
    for text in responses:
        m = re.search(r'"?number"?: \[([^\]]*)\]', text or "")
        try:
            out.append([int(x) for x in m.group(1).split(", ")] if m else None)
        except ValueError:
            out.append(None)
    return pl.Series(out, dtype=pl.List(pl.Int64))


def solved_any_format(responses, cards, split: str) -> list[bool]:
    """Whether the formula written in either format would score +5: the model's skill
    hidden behind a format error (the base writes the plain format)."""
    out = []
    for text, hand_cards in zip(responses, cards):
        m = re.search(r'formula"?: "?([^"\n]*)', text or "")
        formula = m.group(1) if m else ""
        out.append(score(f'"formula": "{formula}"', make_hand(list(hand_cards), split)).reward == 5)
    return out


def step_row(attempts: pl.DataFrame, summary: pl.DataFrame, hands: pl.DataFrame) -> dict:
    s = summary.row(0, named=True)
    joined = attempts.join(hands.select(hand_index="index", hand_numbers="numbers", cards="cards"), on="hand_index")
    right = number_field(joined["response"]) == joined["hand_numbers"]
    right = right.fill_null(False)
    first = joined["attempt"] == 1
    firsts = joined.filter(first)
    any_format = solved_any_format(firsts["response"], firsts["cards"].to_list(), s["split"])
    return {
        "acc": s["accuracy"], "k": s["k"], "acc1": s["first_attempt_accuracy"],
        "num": right.mean(), "num1": right.filter(first).mean(),
        "any1": sum(any_format) / len(any_format), "fmt1": s["first_attempt_format_error_rate"], "ce": s["ce"], "secs": s["seconds"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--store", default="/tmp/rlheal-tune")
    parser.add_argument("--set", action="append", default=[], help="dotted.key=value override (YAML value)")
    parser.add_argument("--splits", default="id,ood")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("rlheal.pretrain").setLevel(logging.INFO)
    torch.set_num_threads(1)
    raw = yaml.safe_load(Path(args.config).read_text())
    for item in args.set:
        override(raw, item)
    cfg = parse_config(raw, args.config)
    store = Store(args.store)
    t = {}
    t0 = time.time()
    data_dir = data.run(store, cfg)
    model_dir = model.run(store, cfg)
    t["data+model"] = time.time() - t0
    t0 = time.time()
    if cfg.pretrain.enabled:
        model_dir = pretrain.run(store, cfg, model_dir)
        print(f"pretrain: {model_dir} final loss {store.manifest(model_dir)['final_loss']:.4f} ({store.manifest(model_dir)['source']})")
    t["pretrain"] = time.time() - t0
    t0 = time.time()
    run_dir = sft.run(store, cfg, model_dir, data_dir)
    t["sft"] = time.time() - t0
    ckpts = pl.read_parquet(Path(run_dir) / "checkpoints.parquet")
    rows = []
    t0 = time.time()
    for ckpt in ckpts.to_dicts():
        row = {"step": ckpt["step"]}
        for split in args.splits.split(","):
            path = eval.run(store, cfg, ckpt, split, Path(data_dir))
            hands = pl.read_parquet(Path(data_dir) / f"eval_set_{split}.parquet")
            m = step_row(pl.read_parquet(path / "eval_attempts.parquet"), pl.read_parquet(path / "eval_summary.parquet"), hands)
            row.update({f"{split}_{k}": v for k, v in m.items()})
        rows.append(row)
        print(rows[-1], flush=True)
    t["eval"] = time.time() - t0
    pl.Config.set_tbl_rows(100), pl.Config.set_tbl_cols(30), pl.Config.set_tbl_width_chars(250)
    table = pl.DataFrame(rows).with_columns(pl.selectors.float().round(3))
    print(table)
    logs = pl.read_parquet(Path(run_dir) / "sft_log.parquet").filter(pl.col("ce_ood").is_not_null())
    print(logs.select("step", "train_loss", "ce_id", "ce_ood").with_columns(pl.selectors.float().round(3)))
    print("seconds:", {k: round(v, 1) for k, v in t.items()})
    table.write_csv(Path(args.store) / f"tune-{int(time.time())}.csv")


if __name__ == "__main__":
    main()
