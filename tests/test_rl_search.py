"""The RL search (tasks/rl/search.py): ID-only selection hands, the documented criteria of
docs/toy-rl.md, the choice rule, and one real search run on the smoke model."""

import polars as pl
import pytest
import yaml

from rlheal.config import ConfigError, load_config, parse_config
from tasks import evaluate
from tasks.generalpoints import SPLITS, overlap_key
from tasks.data import eval_hands
from tasks.rl import search
from tests.conftest import CONFIGS, smoke_config


def _log(rewards, kl=0.01, ev=0.3):
    n = len(rewards)
    return pl.DataFrame({"update": list(range(1, n + 1)), "reward_mean": rewards, "approx_kl": [kl] * n, "clip_fraction": [0.1] * n, "explained_variance": [ev] * n})


BEFORE = {"accuracy": 0.70, "format_error": 0.30}


def test_selection_hands_are_id_hands_outside_the_evaluation_set():
    cfg = load_config(CONFIGS / "toy.yaml")
    table = search.selection_table(cfg, 7, 300)
    held = eval_hands(cfg.data.eval_seed, cfg.data.eval_size)
    evaluation = {overlap_key(h, cfg.data.overlap) for s in SPLITS for h in held[s]}
    assert table.height == 300 and set(table["split"]) == {"id"}
    keys = {overlap_key(h, cfg.data.overlap) for h in evaluate.hands_from_table(table)}
    assert not keys & evaluation
    assert table["eval_set_hash"][0] == "selection-7-300"
    with pytest.raises(ConfigError, match="selection.seed"):
        search.selection_table(cfg, cfg.data.eval_seed, 10)


@pytest.mark.parametrize(
    "rewards, after, kl, flag",
    [
        ([0.0] * 5 + [1.0] * 5, {"accuracy": 0.8, "format_error": 0.30}, 0.01, None),
        ([0.0] * 5 + [1.0] * 5, {"accuracy": 0.8, "format_error": 0.36}, 0.01, "format_ok"),  # +6 points
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


def test_a_search_runs_rl_scores_id_hands_only_and_resumes(tmp_path, monkeypatch):
    cfg_path = smoke_config(tmp_path)
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({
        "name": "s", "start_step": 4, "selection": {"seed": 7, "size": 6},
        "candidates": [{"name": "a", "rl": {"save_steps": [0, 1]}}, {"name": "b", "rl": {"save_steps": [0, 2], "ppo": {"learning_rate": 3e-4}}}],
    }))  # fmt: skip
    played = []
    real = evaluate.evaluate_model

    def spy(model, tok, table, cfg, ckpt):
        played.append((ckpt["ckpt_id"], set(table["split"]), table["eval_set_hash"][0]))
        return real(model, tok, table, cfg, ckpt)

    monkeypatch.setattr(evaluate, "evaluate_model", spy)
    doc = tmp_path / "toy-rl.md"
    doc.write_text(f"{search.DOC_MARKERS[0]}\n{search.DOC_MARKERS[1]}\n")
    assert search.main([str(cfg_path), str(f), "--doc", str(doc)]) == 0
    # the starting checkpoint and each run's last checkpoint, on the selection hands only
    assert sorted(p[0] for p in played) == ["rl-4-1", "rl-4-2", "sft-4", "sft-4"]
    assert all(p[1] == {"id"} and p[2] == "selection-7-6" for p in played)
    table = search.collect(tmp_path / "store" / "rl-search" / "s")
    assert sorted(table["candidate"]) == ["a", "b"] and set(table["updates"]) == {1, 2}
    assert not [c for c in table.columns if "ood" in c.lower()]
    assert (table["gain"] == table["after_accuracy"] - table["before_accuracy"]).all()
    text = doc.read_text()
    assert "| a " in text and "| b " in text
    played.clear()
    assert search.main([str(cfg_path), str(f)]) == 0 and played == []  # done candidates are not rerun
