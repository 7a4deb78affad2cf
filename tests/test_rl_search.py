"""The RL search (tasks/rl/search.py): ID-only selection hands, the documented criteria of
docs/toy-rl.md, the choice rule, and one real search run on the smoke model."""

import itertools

import polars as pl
import pytest
import yaml

from rlheal.config import ConfigError, load_config, parse_config
from tasks import eval
from tasks.generalpoints import SPLITS, overlap_key
from tasks.rl import search
from tests.conftest import CONFIGS, smoke_config
from tasks.benchmark import eval_examples, examples_of, training_stream
from tests.conftest import GP


def _log(rewards, kl=0.01, ev=0.3, algorithm="ppo"):
    n = len(rewards)
    kls = kl if isinstance(kl, list) else [kl] * n
    return pl.DataFrame({"update": list(range(1, n + 1)), "algorithm": algorithm, "reward_mean": rewards, "approx_kl": kls, "clip_fraction": [0.1] * n, "explained_variance": [ev] * n}, schema_overrides={"approx_kl": pl.Float64})


BEFORE = {"accuracy": 0.70, "format_error": 0.30}


def test_selection_hands_are_played_by_no_stage():
    cfg = load_config(CONFIGS / "toy.yaml")
    table = search.selection_table(cfg, 7, 300, 2000)
    held = eval_examples(GP, cfg.data.eval_seed, cfg.data.eval_size)
    evaluation = {overlap_key(h, cfg.data.overlap) for s in SPLITS for h in held[s]}
    sft_hands = {overlap_key(h, cfg.data.overlap) for h in itertools.islice(training_stream(GP, cfg.data.train_seed, evaluation, cfg.data.overlap), cfg.data.train_size)}
    rl_hands = {overlap_key(h, cfg.data.overlap) for h in itertools.islice(training_stream(GP, cfg.rl.seed, evaluation, cfg.data.overlap), 2000)}
    keys = {overlap_key(h, cfg.data.overlap) for h in examples_of(GP, table)}
    assert table.height == 300 and set(table["split"]) == {"id"}
    assert not keys & evaluation and not keys & sft_hands and not keys & rl_hands
    assert table["eval_set_hash"][0] == "selection-7-300-2000"
    for seed, field in ((cfg.data.eval_seed, "data.eval_seed"), (cfg.data.train_seed, "data.train_seed")):
        with pytest.raises(ConfigError, match=f"selection.seed: {seed} is {field}"):
            search.selection_table(cfg, seed, 10, 0)


@pytest.mark.parametrize(
    "rewards, after, kl, flag",
    [
        ([0.0] * 5 + [1.0] * 5, {"accuracy": 0.8, "format_error": 0.30}, 0.01, None),
        ([0.0] * 5 + [1.0] * 5, {"accuracy": 0.8, "format_error": 0.36}, 0.01, "format_ok"),  # +6 points
        ([0.0] * 5 + [1.0] * 5, {"accuracy": 0.8, "format_error": 0.33}, 0.01, None),  # +3 points: within the slack
        ([0.0] * 5 + [1.0] * 5, {"accuracy": 0.8, "format_error": 0.30 + 15 / 300}, 0.01, None),  # exactly +5 (15 of 300 hands)
        ([1.0] * 10, {"accuracy": 0.8, "format_error": 0.30}, 0.01, None),  # a flat reward is not a fall
        ([0.0] * 5 + [1.0] * 5, {"accuracy": 0.8, "format_error": 0.30}, 1.1e-4, None),
        ([0.0] * 5 + [1.0] * 5, {"accuracy": 0.8, "format_error": 0.30}, 0.09, None),
        ([0.0] * 5 + [1.0] * 5, {"accuracy": 0.8, "format_error": 0.30}, [0.5] * 4 + [0.01] * 6, None),  # the median, not the mean
        ([0.0] * 5 + [1.0] * 5, {"accuracy": 0.8, "format_error": 0.30}, [None] * 10, "kl_ok"),  # PPO must log a KL
        ([1.0] * 5 + [0.5] * 5, {"accuracy": 0.8, "format_error": 0.30}, 0.01, "reward_ok"),
        ([0.0] * 5 + [1.0] * 5, {"accuracy": 0.8, "format_error": 0.30}, 5e-5, "kl_ok"),
        ([0.0] * 5 + [1.0] * 5, {"accuracy": 0.8, "format_error": 0.30}, 0.2, "kl_ok"),
    ],
)
def test_criteria_flag_each_kind_of_instability(rewards, after, kl, flag):
    c = search.criteria(_log(rewards, kl), BEFORE, after)
    assert c["gain"] == pytest.approx(0.1)
    failed = [k for k in ("format_ok", "reward_ok", "kl_ok") if not c[k]]
    assert failed == ([flag] if flag else []) and c["stable"] == (flag is None)


def test_value_warmup_updates_do_not_enter_the_kl_median():
    log = _log([0.0] * 5 + [1.0] * 5, [0.0] * 6 + [0.01] * 4)  # 6 warm-up updates logged a zero KL (before they logged none)
    assert not search.criteria(log, BEFORE, {"accuracy": 0.8, "format_error": 0.3})["kl_ok"]
    c = search.criteria(log, BEFORE, {"accuracy": 0.8, "format_error": 0.3}, warmup=6)
    assert c["kl_ok"] and c["median_approx_kl"] == pytest.approx(0.01)


def test_grpo_without_a_kl_penalty_is_not_judged_on_kl():
    c = search.criteria(_log([0.0] * 5 + [1.0] * 5, [None] * 10, algorithm="grpo"), BEFORE, {"accuracy": 0.8, "format_error": 0.3})
    assert c["kl_ok"] and c["stable"] and c["median_approx_kl"] is None


def test_criteria_compare_the_first_and_last_fifth_of_the_updates():
    # 10 updates: fifths are 2 updates; a dip in the middle is not a fall
    c = search.criteria(_log([0.0, 0.0, -3, -3, -3, -3, -3, -3, 0.0, 0.1]), BEFORE, {"accuracy": 0.7, "format_error": 0.3})
    assert (c["reward_first_fifth"], c["reward_last_fifth"]) == (0.0, pytest.approx(0.05)) and c["reward_ok"]


def _row(name, gain, stable=True, generations=100, ev=0.1):
    return {"candidate": name, "gain": gain, "stable": stable, "generations": generations, "final_explained_variance": ev}


def test_choice_takes_the_best_stable_gain_and_breaks_ties_by_cost_then_critic():
    t = pl.DataFrame([_row("big", 0.20, generations=1000), _row("cheap", 0.19, generations=100), _row("wild", 0.50, stable=False)])
    assert search.choose(t) == "cheap"  # 0.19 is within 2 points of 0.20; "wild" is not stable
    t = pl.DataFrame([_row("big", 0.20, generations=1000), _row("cheap", 0.17, generations=100)])
    assert search.choose(t) == "big"
    t = pl.DataFrame([_row("a", 0.2, ev=0.1), _row("b", 0.2, ev=0.5)])
    assert search.choose(t) == "b"
    t = pl.DataFrame([_row("cheap", 0.2, generations=100, ev=0.1), _row("critic", 0.2, generations=1000, ev=0.9)])
    assert search.choose(t) == "cheap"  # cost before the critic
    t = pl.DataFrame([_row("grpo", 0.2, ev=None), _row("ppo", 0.2, ev=0.0)])
    assert search.choose(t) == "ppo"  # no explained variance ranks last
    t = pl.DataFrame([_row("big", 0.20, generations=1000), _row("cheap", 0.20 - 6 / 300, generations=100)])
    assert search.choose(t) == "cheap"  # exactly 2 points (6 of 300 hands) is a tie
    assert search.choose(pl.DataFrame([_row("x", 0.3, stable=False)])) is None


def test_record_block_is_rewritten_in_place(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text(f"# head\n{search.DOC_MARKERS[0]}\nold\n{search.DOC_MARKERS[1]}\ntail\n")
    search.write_doc(doc, pl.DataFrame())
    assert doc.read_text() == f"# head\n{search.DOC_MARKERS[0]}\n(no candidate has run yet)\n{search.DOC_MARKERS[1]}\ntail\n"
    (tmp_path / "e.md").write_text("no markers")
    with pytest.raises(ConfigError, match="e.md"):
        search.write_doc(tmp_path / "e.md", pl.DataFrame())


def test_bad_search_file_names_the_field(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "s", "start_step": 2, "candidates": []}))
    assert search.main([str(CONFIGS / "smoke.yaml"), str(f), "--store", str(tmp_path / "store")]) == 2
    assert "'selection'" in capsys.readouterr().err
    f.write_text(yaml.safe_dump({"name": "s", "start_step": 2, "selection": {"seed": 7, "size": 4}, "candidates": [{"name": "a", "rl": {"ppo": {"clip": -1}}}]}))
    assert search.main([str(CONFIGS / "smoke.yaml"), str(f), "--store", str(tmp_path / "store")]) == 2
    assert "rl.ppo.clip" in capsys.readouterr().err
    assert not (tmp_path / "store" / "rl-search").exists()  # nothing written before every candidate validates
    good = {"name": "s", "start_step": 2, "selection": {"seed": 7, "size": 4}, "candidates": [{"name": "a"}]}
    for bad, field in (
        ({"selection": {"seed": 7}}, "selection.size"),
        ({"selection": {"seed": "x", "size": 4}}, "selection.seed"),
        ({"selection": {"seed": 42, "size": 4}}, "selection.seed: 42 is data.eval_seed"),
        ({"start_step": 3}, "start_step: 3"),
        ({"candidates": ["a"]}, "candidates"),
        ({"candidates": [{"name": "a"}, {"name": "a"}]}, "unique name"),
        ({"candidates": [{"name": "a", "rl": None}]}, "candidates"),
        ({"candidates": [{"name": "a", "rl": {"seed": 3}}]}, "rl.seed"),
    ):
        f.write_text(yaml.safe_dump({**good, **bad}))
        assert search.main([str(CONFIGS / "smoke.yaml"), str(f), "--store", str(tmp_path / "store")]) == 2, field
        assert field in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # refused before any stage ran


def test_a_search_runs_rl_scores_id_hands_only_and_resumes(tmp_path, monkeypatch):
    cfg_path = smoke_config(tmp_path)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({
        "name": "s", "start_step": 4, "selection": {"seed": 7, "size": 6},
        "candidates": [{"name": "a", "rl": {"save_steps": [0, 1]}}, {"name": "b", "rl": {"save_steps": [0, 2], "ppo": {"learning_rate": 3e-4}}}],
    }))  # fmt: skip
    played = []
    real = eval.evaluate_model

    def spy(model, tok, table, cfg, ckpt):
        played.append((ckpt["ckpt_id"], set(table["split"]), table["eval_set_hash"][0]))
        return real(model, tok, table, cfg, ckpt)

    monkeypatch.setattr(eval, "evaluate_model", spy)
    doc = tmp_path / "toy-rl.md"
    doc.write_text(f"{search.DOC_MARKERS[0]}\n{search.DOC_MARKERS[1]}\n")
    assert search.main([str(cfg_path), str(f), "--doc", str(doc)]) == 0
    # the starting checkpoint and each run's last checkpoint, on the selection hands only
    assert sorted(p[0] for p in played) == ["rl-4-1", "rl-4-2", "sft-4", "sft-4"]
    assert all(p[1] == {"id"} and p[2] == "selection-7-6-32" for p in played)  # 16 x 2 generations per update, 2 updates
    table = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / "store" / "rl-search" / "s").glob("*.parquet"))])
    assert sorted(table["candidate"]) == ["a", "b"] and set(table["updates"]) == {1, 2}
    assert not [c for c in table.columns if "ood" in c.lower()]
    assert (table["gain"] == table["after_accuracy"] - table["before_accuracy"]).all()
    text = doc.read_text()
    assert "| a " in text and "| b " in text
    played.clear()
    assert search.main([str(cfg_path), str(f)]) == 0 and played == []  # done candidates are not rerun
    # a changed candidate is a new row, never the old one reused
    f.write_text(yaml.safe_dump({
        "name": "s", "start_step": 4, "selection": {"seed": 7, "size": 6},
        "candidates": [{"name": "a", "rl": {"save_steps": [0, 1], "ppo": {"learning_rate": 2e-4}}}, {"name": "b", "rl": {"save_steps": [0, 2], "ppo": {"learning_rate": 3e-4}}}],
    }))  # fmt: skip
    assert search.main([str(cfg_path), str(f)]) == 0 and sorted(p[0] for p in played) == ["rl-4-1", "sft-4"]
