"""The V-IRL tiny base's pretraining corpus (docs/pretrain.md, "V-IRL"): both kinds of turning
in other wordings, never the benchmark's prompt under either action space, never an
evaluation route; and the shipped V-IRL base."""

import json
import re
from pathlib import Path

import polars as pl
import pytest

from rlheal.config import load_config, parse_config
from rlheal.store import Store
from tasks import benchmark, lm, pretrain
from tasks.model import build_tokenizer
from tasks.virl import corpus as vc
from tasks.virl import navigation as nv
from tasks.virl import routes as rt

ROOT = Path(__file__).resolve().parents[1]
TOY = load_config(ROOT / "configs/toy-virl.yaml")


@pytest.fixture(scope="module")
def table():
    return vc.corpus(seed=0, size=3000, block_fraction=1 / 3)


def test_the_parser_reads_the_benchmark_action_spaces_so_the_check_below_would_catch_them():
    for split, rule in (("id", "absolute"), ("ood", "relative")):
        text = nv.prompt(rt.generate(0, 0), split, [], nv.rail(rt.generate(0, 0))[0])
        assert vc.stated_values(text) == ("benchmark", list(vc.RULES[rule]))
    shuffled = vc.action_space(["right", "left", "slightly right", "slightly left"], "one_of")
    assert vc.stated_values(shuffled + "\n") == ("one_of", ["right", "left", "slightly right", "slightly left"])
    with pytest.raises(ValueError):
        vc.stated_values(nv.action_space("id").replace("x could be any following", "x may be") + "\n")


def test_no_example_is_the_benchmark_prompt_and_every_answer_follows_its_stated_rule(table):
    for row in table.iter_rows(named=True):
        prompt, answer = row["prompt"], row["answer"]
        assert nv._ACTIONS["id"] not in prompt and nv._ACTIONS["ood"] not in prompt
        wording, values = vc.stated_values(prompt)  # what the text states, read back from the text
        assert wording == row["wording"] != "benchmark"
        rule = "absolute" if set(values) == set(rt.COMPASS) else "relative"
        assert rule == row["rule"] and sorted(values) == sorted(vc.RULES[rule])
        action = re.search(r'action"?: "?([a-z_]+\([a-z ]*\))', answer).group(1)
        sentence = re.search(r'instruction"?: "?(.*?\.)"?,?\n', answer).group(1)
        assert action == row["action"]
        if action.startswith("turn_direction("):
            x = action[len("turn_direction(") : -1]
            assert x in values
            relative_word, direction = re.fullmatch(r"(?:First, turn|Turn) (.*) to face (.*)\.", sentence).groups()
            # the action is the current sentence's relative word or its compass direction, as the rule says
            assert x == (relative_word if rule == "relative" else direction)
        # the history's past turns are written under the same rule
        for past in re.findall(r"A_\d+: turn_direction\(([a-z ]+)\)", prompt):
            assert past in vc.RULES[rule]


def test_each_example_is_its_route_under_the_documented_draws(table):
    """Rebuilt from the docs' recipe: the route of the corpus stream (d = 0: nothing excluded),
    the exact-mode rail, the rule's history in order, the stated sentence, the answer."""
    rows = [(0, r) for r in table.head(600).iter_rows(named=True)] + [(1, r) for r in vc.corpus(1, 50, 1 / 3).iter_rows(named=True)]
    for seed, row in rows:
        route = rt.generate(seed, 1000 * row["index"], vc.STREAM)
        points = nv.rail(route, "exact")
        split, here = vc.SPLIT_OF[row["rule"]], points[row["step"]]
        _, values = vc.stated_values(row["prompt"])
        assert row["prompt"] == nv.prompt(route, split, points[: row["step"]], here, "exact").replace(nv.action_space(split), vc.action_space(values, row["wording"]))
        sentence = nv.sentences(route, "exact")[here.sentence]
        assert row["answer"] == (nv.answer(route, split, here, "exact") if row["format"] == "block" else vc.plain_answer(here.observation, sentence, here.action[split]))
        assert row["turning"] == here.action["id"].startswith("turn_direction(")


def test_the_corpus_shares_are_the_documented_ones(table):
    def share(col, value):
        return table.filter(pl.col(col) == value).height / table.height

    # the documented values (docs/pretrain.md), not the module's constants
    assert abs(share("rule", "relative") - 0.5) < 0.04
    assert abs(share("format", "block") - 1 / 3) < 0.04
    assert abs(share("shuffled", True) - 1 / 3) < 0.04
    # 1/2 drawn at a turning point, plus the turning points among the uniform draws (~1/3)
    assert 0.6 < share("turning", True) < 0.72
    for wording in ("one_of", "choose", "braces"):
        assert abs(share("wording", wording) - 1 / 3) < 0.04


def test_an_evaluation_route_is_never_walked(tmp_path):
    first = vc.example(0, 3, 1 / 3)
    own = rt.generate(0, 3000, vc.STREAM)  # the route example 3 walks
    again = vc.example(0, 3, 1 / 3, exclude=frozenset({(own.points, own.init_heading)}))
    assert again["prompt"] != first["prompt"]
    assert len(vc.evaluation_routes(TOY, benchmark.of(TOY))) == TOY.data.eval_size  # both splits walk the same routes
    # a routes file made of the corpus's own routes: the study's corpus must walk around its evaluation routes
    corpus_routes = [rt.generate(0, 1000 * i, vc.STREAM) for i in range(12)]
    rt.write(corpus_routes, tmp_path / "route_infos.json")
    cfg = parse_config(TOY.model_dump() | {"virl": {"routes": str(tmp_path / "route_infos.json")}, "data": TOY.data.model_dump() | {"eval_size": 8}})
    bench = benchmark.get("virl", json.dumps({"routes": cfg.virl.routes}))
    held_out = vc.evaluation_routes(cfg, bench)
    assert len(held_out) == 8
    instructions = {nv.instruction(r) for r in corpus_routes if (r.points, r.init_heading) in held_out}
    walked = bench.corpus(cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"corpus_size": 12})}))
    assert not any(i in p for p in walked["prompt"] for i in instructions)


def test_the_corpus_is_deterministic_and_a_prefix_of_any_longer_one(table):
    assert vc.corpus(0, 200, 1 / 3).equals(table.head(200))
    assert not vc.corpus(1, 200, 1 / 3)["prompt"].equals(table.head(200)["prompt"])


def test_every_corpus_text_round_trips_through_the_tiny_tokenizer(table):
    tok = build_tokenizer(benchmark.of(TOY))
    longest = 0
    for text in [*table.head(300)["prompt"], *table.head(300)["answer"]]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text and tok.unk_token_id not in ids
        longest = max(longest, len(ids))
    assert longest < TOY.model.tiny.max_position_embeddings - 128
    # the corpus's own wordings are one token each, like the benchmark's fixed chunks
    assert len(tok("choose x from: ")["input_ids"]) == 1 and len(tok("observation: ")["input_ids"]) == 1


def test_the_shipped_virl_base_matches_its_hash_and_is_what_the_virl_toy_uses(tmp_path):
    assert pretrain.shipped_problem(task="virl") is None
    record = pretrain.shipped_record(task="virl")
    assert TOY.pretrain.enabled and TOY.pretrain.use_shipped
    assert record["key"] == json.loads(json.dumps(pretrain.shipped_key(TOY)))
    assert record["command"] == pretrain.rebuild_command("virl")
    folder = pretrain.SHIPPED / pretrain.SHIPPED_NAMES["virl"]
    tok, model = lm.load_tokenizer(folder), lm.load_model(folder)
    assert len(tok) == model.config.vocab_size == len(build_tokenizer(benchmark.of(TOY)))
    # the GeneralPoints base is not taken for a V-IRL study, nor the other way round
    assert pretrain.shipped_record(task="generalpoints")["key"]["task"] == "generalpoints"
    store = Store(tmp_path)
    from tasks import model as model_stage

    out = pretrain.run(store, TOY, model_stage.run(store, TOY))
    assert store.manifest(out)["source"] == "shipped"
    assert lm.weights_hash(out) == record["weights_sha256"]


def test_a_virl_pretraining_run_is_accepted_for_the_builtin_model_only():
    parse_config({"name": "v", "task": "virl", "pretrain": {"enabled": True}})
    with pytest.raises(Exception, match="pretrain.enabled"):
        parse_config({"name": "v", "task": "virl", "model": {"builtin": None, "name_or_path": "x/y"}, "pretrain": {"enabled": True}})


@pytest.mark.slow
def test_full_rebuild_of_the_shipped_virl_base_gives_its_hash():
    assert pretrain.main([str(ROOT / "configs/toy-virl.yaml")]) == 0


def test_a_changed_vocabulary_or_corpus_is_another_model_and_another_base(monkeypatch):
    """Review of issue 17: new phrases kept the old model key (a stale tokenizer), and an edit
    of the corpus code kept the old pretrain key (the old shipped base copied)."""
    from tasks import model as model_stage
    from tasks.virl.benchmark import Virl

    before = model_stage.key_config(TOY), pretrain.key_config(TOY)
    benchmark.get.cache_clear()
    monkeypatch.setattr(Virl, "phrases", lambda self: ["a new chunk"])
    assert model_stage.key_config(TOY) != before[0]
    monkeypatch.setattr(Virl, "corpus_version", "2")
    assert pretrain.key_config(TOY) != before[1]
    benchmark.get.cache_clear()
