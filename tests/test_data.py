"""The data stage: tables, hashes, disjointness, and a cached re-run through the real CLI."""

import dataclasses
import hashlib
import itertools
import json
import re
import subprocess
import sys

import datasets
import polars as pl
import pytest
import yaml

from rlheal.config import parse_config
from rlheal.store import Store
from tasks import data
from tasks.generalpoints import deal, overlap_key, reference_answer, render_prompt
from tasks.benchmark import eval_examples, training_stream
from tests.conftest import GP


def cfg_with(**data_fields):
    return parse_config({"name": "d", "data": {"train_size": 200, "eval_size": 20, **data_fields}, "sft": {"save_steps": [0, 1], "batch_size": 8, "per_device_batch_size": 8}})


def test_tables_hold_what_the_spec_says(tmp_path):
    cfg = cfg_with(multi_turn_fraction=0.5)
    out = data.run(Store(tmp_path), cfg)
    train = pl.read_parquet(out / "sft_train.parquet")
    assert train.height == 200 and train["index"].is_unique().all()
    row = train.row(0, named=True)
    hand = deal("id", 0, row["index"])
    assert row["cards"] == list(hand.cards) and row["formula"] == hand.reference
    assert row["completion"] == [{"role": "assistant", "content": reference_answer(hand)}]
    assert row["prompt"][0] == {"role": "user", "content": render_prompt(hand)}
    assert 0.35 < train["multi_turn"].mean() < 0.65
    for split in ("id", "ood"):
        ev = pl.read_parquet(out / f"eval_set_{split}.parquet")
        assert ev["index"].to_list() == list(range(20)) and (ev["split"] == split).all()
        assert ev["prompt"][7] == render_prompt(deal(split, 42, 7))
    # the evaluation-set hash of GP §2, recomputed independently
    items = [[s, i, list(deal(s, 42, i).cards)] for s in ("id", "ood") for i in range(20)]
    expected = hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()
    assert Store(tmp_path).manifest(out)["eval_set_hash"] == expected
    assert pl.read_parquet(out / "eval_set_ood.parquet")["eval_set_hash"].unique().to_list() == [expected]


def test_answer_first_uses_the_first_canonical_solution(tmp_path):
    out = data.run(Store(tmp_path), cfg_with(answer="first"))
    row = pl.read_parquet(out / "sft_train.parquet").row(3, named=True)
    assert row["formula"] == deal("id", 0, row["index"]).solutions[0]


@pytest.mark.parametrize("answer", ["reference", "first"])
def test_eval_tables_carry_the_answer_sft_trains_on(tmp_path, answer):
    """`target` is the completion an SFT row of the hand would hold (what the reference CE
    scores, training.md §7.3), `answer` the dealt reference, `ce_target` which one SFT uses."""
    cfg = cfg_with(answer=answer)
    out = data.run(Store(tmp_path), cfg)
    for split in ("id", "ood"):
        ev = pl.read_parquet(out / f"eval_set_{split}.parquet")
        hands = [deal(split, 42, i) for i in range(20)]
        assert ev["answer"].to_list() == [reference_answer(h) for h in hands]
        assert ev["target"].to_list() == [GP.sft_row(h, cfg)["completion"][0]["content"] for h in hands]
        assert ev["ce_target"].unique().to_list() == [answer]
        firsts = [reference_answer(dataclasses.replace(h, reference=h.solutions[0])) for h in hands]
        assert ev["target"].to_list() == (firsts if answer == "first" else ev["answer"].to_list())
        if answer == "first":  # the hands where the two answers differ are most of them
            assert sum(a != t for a, t in zip(ev["answer"], ev["target"])) >= 10


@pytest.mark.parametrize("overlap", ["ordered", "multiset"])
def test_training_and_evaluation_hands_are_disjoint_on_100k_hands(overlap):
    hands = eval_examples(GP, 42, 234)
    exclude = {overlap_key(h, overlap) for s in hands for h in hands[s]}
    seen, skipped = 0, 0
    for hand in training_stream(GP, 0, exclude, overlap):
        assert overlap_key(hand, overlap) not in exclude
        seen += 1
        skipped = hand.index + 1 - seen
        if hand.index >= 99_999:
            break
    # ordered removes ~1.1 % of the ID mass at 234 hands, multiset ~20 % (GP §2)
    share = skipped / 100_000
    assert (0.005 < share < 0.02) if overlap == "ordered" else (0.15 < share < 0.25)


def test_overlap_check_catches_a_planted_duplicate(tmp_path, monkeypatch):
    """The build checks disjointness itself: a stream that (wrongly) yields an evaluation
    hand first fails the stage instead of training on it."""
    planted = eval_examples(GP, 42, 20)["id"][3]
    real = data.training_stream
    monkeypatch.setattr(data, "training_stream", lambda *a: itertools.chain([planted], real(*a)))
    with pytest.raises(data.OverlapError, match="equals an evaluation example"):
        data.run(Store(tmp_path), cfg_with())


def test_same_config_is_a_cache_hit_and_other_config_is_not(tmp_path):
    store = Store(tmp_path)
    a = data.run(store, cfg_with())
    stamp = (a / "manifest.json").stat().st_mtime_ns
    assert data.run(store, cfg_with()) == a and (a / "manifest.json").stat().st_mtime_ns == stamp
    assert data.run(store, cfg_with(eval_size=21)) != a
    # the model and sft sections do not touch the data key
    other = parse_config({"name": "zz", "model": {"builtin": "tiny", "tiny": {"hidden_size": 32}}, "data": {"train_size": 200, "eval_size": 20}, "sft": {"save_steps": [0, 2], "batch_size": 8, "per_device_batch_size": 8}})
    assert data.artifact(store, other) == data.artifact(store, cfg_with())


def test_cli_run_writes_study_tables_and_reruns_cached(cli_env, tmp_path):
    cfg = tmp_path / "study.yaml"
    cfg.write_text(yaml.safe_dump({"name": "cli", "store": str(tmp_path / "store"), "data": {"train_size": 64, "eval_size": 8}, "sft": {"save_steps": [0, 2], "batch_size": 8, "per_device_batch_size": 8, "ce_every": 100}, "eval": {"ce_hands": 4, "decoding": {"max_new_tokens": 16}}, "rl": {"from_steps": []}, "edit": {"enabled": False}}))
    cmd = [sys.executable, "-m", "flows.cli", "run", str(cfg)]
    first = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    tables = tmp_path / "store" / "studies" / "cli" / "tables"
    assert {p.name for p in tables.glob("*.parquet")} >= {"sft_train.parquet", "eval_set_id.parquet", "eval_set_ood.parquet", "checkpoints.parquet", "sft_log.parquet"}
    assert pl.scan_parquet(tables / "eval_set_ood.parquet").select(pl.len()).collect().item() == 8
    assert datasets.Dataset.from_parquet(str(tables / "sft_train.parquet")).num_rows == 64
    # the terminal's progress display: every stage from the start, the finished counts at the end
    lines = re.findall(r"^\[cli \d+:\d\d\] (.*)$", first.stderr, re.M)
    assert lines[0].startswith("data - | model - | sft - |"), lines
    assert all(f" {c} " in f" {lines[-1]} " for c in ("data 1/1", "model 1/1", "sft 1/1", "eval 4/4", "report 1/1")), lines
    # without -v the terminal holds the progress lines, warnings and the result, no log lines
    assert "Finished in state" not in first.stdout + first.stderr and "rlheal.sft INFO" not in first.stdout + first.stderr
    second = subprocess.run([*cmd, "-v"], env=cli_env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0
    log = second.stdout + second.stderr
    # every artifact sealed: no stage task runs at all (issue 18), the report is kept
    assert "sft step" not in log and "report: up to date" in log and "Finished in state Cached" not in log
    assert log.count("Finished in state Completed()") == 3  # the study flow, its stages flow, the report task
