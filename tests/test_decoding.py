"""Decoding per stage (training.md §6): a partial `decoding:` section keeps its stage's preset
(evaluation `greedy`, RL `rl_default`), RL rolls out by sampling, and a greedy PPO rollout is a
config error unless the config asks for it."""

import subprocess
import sys

import pytest
import torch
import yaml

from rlheal.config import ConfigError, load_config, parse_config
from tasks import lm
from tasks.model import build_tiny
from tasks.generalpoints import deal, render_prompt
from tasks.rl.rollout import Generator
from tests.conftest import CONFIGS, ROOT


def test_a_partial_section_keeps_its_stages_preset():
    cfg = parse_config({"name": "t", "eval": {"decoding": {"max_new_tokens": 40}}, "rl": {"decoding": {"max_new_tokens": 64}}})
    assert cfg.eval.decoding.resolved() == {**parse_config({"name": "t"}).eval.decoding.resolved(), "max_new_tokens": 40}
    assert cfg.eval.decoding.resolved()["preset"] == "greedy" and not cfg.eval.decoding.resolved()["do_sample"]
    rl = cfg.rl.decoding.resolved()
    assert rl == {"preset": "rl_default", "do_sample": True, "temperature": 0.2, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "max_new_tokens": 64, "seed": 42}
    # a seed alone (as `make demo-seeds` sets it) keeps the preset too
    assert parse_config({"name": "t", "rl": {"decoding": {"seed": 43}}}).rl.decoding.resolved()["preset"] == "rl_default"
    # only an explicit preset changes it
    assert parse_config({"name": "t", "rl": {"decoding": {"preset": "authors_rl_qwen"}}}).rl.decoding.resolved()["top_k"] == 20
    assert parse_config({"name": "t", "eval": {"decoding": {"preset": "authors_eval_llama"}}}).eval.decoding.resolved()["temperature"] == 0.6


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_rolls_out_by_sampling(name):
    d = load_config(CONFIGS / name).rl.decoding.resolved()
    assert d["do_sample"] is True and d["temperature"] > 0, d
    assert d["preset"] in ("rl_default", "authors_rl_llama", "authors_rl_qwen"), d


def test_greedy_rollouts_are_refused_unless_asked_for():
    for decoding in ({"preset": "greedy"}, {"do_sample": False}, {"preset": "authors_rl_llama", "do_sample": False}):
        with pytest.raises(ConfigError, match=r"rl\.decoding: rolls out greedily .*rl\.allow_greedy_rollouts: true"):
            parse_config({"name": "t", "rl": {"decoding": decoding}})
        allowed = parse_config({"name": "t", "rl": {"decoding": decoding, "allow_greedy_rollouts": True}})
        assert allowed.rl.decoding.resolved()["do_sample"] is False
    # no RL, or GRPO (which samples with rl.grpo's own settings): nothing to refuse
    assert parse_config({"name": "t", "rl": {"from_steps": [], "decoding": {"preset": "greedy"}}}).rl.from_steps == []
    assert parse_config({"name": "t", "rl": {"algorithm": "grpo", "decoding": {"preset": "greedy"}}}).rl.algorithm == "grpo"


def test_cli_validate_refuses_a_greedy_rollout_with_status_2(tmp_path):
    path = tmp_path / "greedy.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "rl": {"decoding": {"preset": "greedy"}}}))
    r = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "rl.decoding: rolls out greedily" in r.stderr, (r.returncode, r.stderr)


def test_a_rollout_of_one_prompt_at_temperature_1_gives_distinct_completions(tmp_path):
    """16 samples of one prompt on the (untrained) tiny model, through the rollout Generator
    with the config's resolved RL decoding. Sampled: 16 of 16 distinct here, as expected
    at tau = 1 on a near-uniform model; greedy rollouts would give 1."""
    cfg = parse_config({"name": "t", "rl": {"decoding": {"temperature": 1.0, "max_new_tokens": 16}}})
    build_tiny(tmp_path, cfg)
    tok, model = lm.load_tokenizer(tmp_path), lm.load_model(tmp_path).eval()
    generate = Generator(model, tok, cfg.rl.decoding.resolved(), cfg.chat.date_string)
    prompt = generate.prompt_ids([{"role": "user", "content": render_prompt(deal("id", 0, 0))}])
    torch.manual_seed(0)
    completions = {tuple(r) for r in generate([prompt] * 16)}
    assert len(completions) > 8, len(completions)
