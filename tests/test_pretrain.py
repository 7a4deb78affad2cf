"""The pretrain stage: a corpus that never holds an ID- or OOD-rule example, a short real
pretraining run, the bit-for-bit rebuild path, and the shipped base checkpoint."""

import json
import math
import re
from pathlib import Path

import polars as pl
import pytest
import torch

from rlheal.config import load_config, parse_config
from rlheal.store import Store
from tasks import lm, pretrain
from tasks.model import build_tokenizer
import tasks.model
from tasks.generalpoints import FACE, corpus, evaluate
from tasks.generalpoints.corpus import RULES, parse_answer, parse_face, prompt_face, same_answer_as, values_under
from tests.conftest import GP

ROOT = Path(__file__).resolve().parents[1]
SHORT = {
    "name": "t",
    "pretrain": {"enabled": True, "steps": 30, "batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 5, "corpus_size": 200, "use_shipped": False},
}


def test_the_parser_reads_the_benchmark_rules_so_the_check_below_would_catch_them():
    assert parse_face(FACE["id"]) == RULES["id"]
    assert parse_face(FACE["ood"]) == RULES["ood"]
    assert parse_face("'K' is '3', 'J' is '12', and 'Q' is '1'.") == (12, 1, 3)
    with pytest.raises(ValueError):
        parse_face("'J', 'J', and 'K' count as '1', '2', and '3' respectively.")


def test_corpus_never_holds_an_id_or_ood_rule_example():
    table = corpus.corpus(seed=0, size=10_000, block_fraction=1 / 3)
    assert table.height == 10_000
    coincide = {"id": 0, "ood": 0}
    for prompt, answer in zip(table["prompt"], table["answer"]):
        assert FACE["id"] not in prompt and FACE["ood"] not in prompt
        sentence = prompt_face(prompt)
        rule = parse_face(sentence)  # what the text states, read back from the text
        assert rule not in RULES.values()
        cards, numbers = parse_answer(answer)
        assert any(c in "JQK" for c in cards)
        assert prompt == corpus.prompt_text(cards, sentence)  # the rest is the benchmark's text
        assert tuple(numbers) == values_under(cards, rule)  # the answer computes with the stated rule
        for split in coincide:
            coincide[split] += same_answer_as(cards, numbers, split)
        formula = re.search(r'formula"?: "?(.*)=24', answer).group(1)
        assert evaluate(formula) == 24
        assert sorted(int(n) for n in re.findall(r"\d+", formula)) == sorted(numbers)
    shares = table["format"].value_counts(normalize=True).sort("format")
    assert abs(shares.filter(pl.col("format") == "block")["proportion"][0] - 1 / 3) < 0.02
    # answers that read like a benchmark rule's on their hand (a lone J = 11, ...): a few %, docs/pretrain.md
    assert 0 < coincide["id"] < 600 and 0 < coincide["ood"] < 800
    wordings = {re.sub(r"'[^']*'", "_", prompt_face(p)) for p in table["prompt"]}
    assert len(wordings) == 4  # one, listed, each, short


def test_corpus_never_deals_an_evaluation_hand():
    cfg = parse_config({"name": "t", "data": {"eval_size": 500}})
    exclude = corpus.evaluation_cards(cfg)
    assert len(exclude) > 900  # both splits
    table = corpus.corpus(seed=0, size=3000, block_fraction=1 / 3, exclude=exclude)
    assert not {tuple(c) for c in table["cards"].to_list()} & exclude
    multiset = corpus.evaluation_cards(parse_config({"name": "t", "data": {"eval_size": 50, "overlap": "multiset"}}))
    table = corpus.corpus(seed=0, size=3000, block_fraction=1 / 3, exclude=multiset, overlap="multiset")
    assert not {tuple(sorted(c)) for c in table["cards"].to_list()} & multiset


def test_corpus_is_deterministic_and_a_prefix_of_any_longer_one():
    a = corpus.corpus(seed=3, size=300, block_fraction=1 / 3)
    b = corpus.corpus(seed=3, size=500, block_fraction=1 / 3)
    assert a.equals(b.head(300))
    assert not a.equals(corpus.corpus(seed=4, size=300, block_fraction=1 / 3))


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("store"))
    cfg = parse_config(SHORT)
    model_dir = tasks.model.run(store, cfg)
    return store, cfg, Path(model_dir), Path(pretrain.run(store, cfg, model_dir))


def test_short_pretraining_lowers_loss_and_writes_a_loadable_hf_dir(short_run):
    store, cfg, model_dir, out = short_run
    log = pl.read_parquet(out / pretrain.LOG)  # mean answer-token loss of steps 1-25, then 26-30
    assert log["step"].to_list() == [25, 30]
    assert log["loss"][1] < log["loss"][0] - 0.5 and log["loss"][0] < math.log(build_tokenizer(GP).__len__())
    m = store.manifest(out)
    assert m["source"] == "trained" and m["weights_sha256"] == lm.weights_hash(out) != lm.weights_hash(model_dir)
    tok, model = lm.load_tokenizer(out), lm.load_model(out)
    ids = torch.tensor([tok("Cards: ['J', '2', 'A', 'A']")["input_ids"]])
    assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    # cached by config: a second run is a look-up
    assert pretrain.run(store, cfg, model_dir) == out


def test_rebuild_path_is_bit_for_bit(tmp_path):
    cfg = parse_config(SHORT)
    a, b = tmp_path / "a", tmp_path / "b"
    ra, rb = pretrain.ship(cfg, a), pretrain.ship(cfg, b)
    assert ra["weights_sha256"] == rb["weights_sha256"] and ra["files"] == rb["files"]
    assert pretrain.shipped_problem(a) is None
    (a / pretrain.SHIPPED_NAME / "model.safetensors").write_bytes(b"damaged")
    assert "model.safetensors" in pretrain.shipped_problem(a)


def test_shipped_base_matches_its_hash_loads_and_is_what_the_toy_study_uses(tmp_path):
    assert pretrain.shipped_problem() is None
    record = pretrain.shipped_record()
    folder = pretrain.SHIPPED / pretrain.SHIPPED_NAME
    assert sum(f.stat().st_size for f in folder.iterdir()) < 1_000_000
    cfg = load_config(ROOT / "configs/toy.yaml")
    assert cfg.pretrain.enabled and cfg.pretrain.use_shipped
    assert record["key"] == json.loads(json.dumps(pretrain.shipped_key(cfg)))
    assert record["command"] == pretrain.rebuild_command()
    tok, model = lm.load_tokenizer(folder), lm.load_model(folder)
    assert len(tok) == model.config.vocab_size
    # `run` copies it instead of training (seconds, not minutes)
    store = Store(tmp_path)
    out = pretrain.run(store, cfg, tasks.model.run(store, cfg))
    assert store.manifest(out)["source"] == "shipped"
    assert lm.weights_hash(out) == record["weights_sha256"]


@pytest.mark.slow
def test_full_rebuild_of_the_shipped_base_gives_its_hash():
    assert pretrain.main([str(ROOT / "configs/toy.yaml")]) == 0
