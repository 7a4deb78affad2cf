"""The RL stage. First PPO's equations on small hand-computed tensors and the sequence-score
split on real tokenizer output; then real runs from a weak tiny SFT checkpoint: PPO raises
the ID reward, GRPO writes its checkpoints, and an interrupted run resumes where it stopped
and ends where an uninterrupted run ends."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlheal.config import ConfigError, parse_config
from rlheal.faults import InjectedFault
from rlheal.store import Store
from tasks import data, lm, model, rl, sft
from tasks.model import build_tiny
from tasks.chat import encode, prompt_completion_ids
from tasks.generalpoints import OUTCOMES, deal, overlap_key, reference_answer, render_prompt, score
from tasks.rl import common, grpo, ppo
from tasks.benchmark import training_stream
from tasks.rl.rollout import Envs, Generator, Step, rollout, success_rate
from tests.conftest import GP, kill_when

ROOT = Path(__file__).resolve().parents[1]

# A weak tiny SFT model: 30 steps at a high learning rate. It has learned parts of the answer
# format but not to read the cards: sampled at temperature 1, most first attempts score -3
# (illegal characters) and a long tail of formulas with many violations scores -4 .. -28.
# Its weights hinge on float details (a 1 % relative difference between AVX-512 and AVX2
# kernels, ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2), its sampled behaviour does
# not: mean sampled first-attempt reward -5.85 and -5.76 (greedy: -6.67 and -4.00).
WEAK = {
    "name": "t",
    "data": {"train_size": 960, "eval_size": 8},
    "sft": {"save_steps": [0, 30], "batch_size": 32, "per_device_batch_size": 32, "learning_rate": 1e-2, "lr_schedule": "constant", "ce_every": 1000},
    "eval": {"ce_hands": 0},
}
# PPO on that model, rollouts sampled at temperature 1. training.md's defaults (lr 1e-6,
# grad norm 0.01) are for 11B models; a 100k-parameter model needs a larger step: 3e-4
# (1e-4 gained 0.4 to 1.1 over 6 runs, too close to the noise). One graded attempt per hand
# keeps the conversations short; the value coefficient is lowered so that the value loss of
# the early updates (returns near -10) does not drown the policy gradient in the shared backbone.
PPO = {
    "verifier": {"verify_iter": 1},
    "rl": {
        "save_steps": [0, 6, 12],
        "decoding": {"temperature": 1.0, "max_new_tokens": 64},
        "ppo": {"num_envs": 32, "steps_per_env": 2, "micro_batch_size": 32, "learning_rate": 3e-4, "max_grad_norm": 1.0, "value_coef": 0.05},
    },
}
# Small and quick: for the resume and table tests.
QUICK = {
    "rl": {
        "save_steps": [0, 2, 4],
        "decoding": {"temperature": 1.0, "max_new_tokens": 40},
        "ppo": {"num_envs": 6, "steps_per_env": 3, "micro_batch_size": 4, "minibatch_size": 9, "epochs": 2, "learning_rate": 1e-4, "max_grad_norm": 1.0},
    },
}


class Killed(BaseException):
    """Not an Exception: like a kill, nothing on the way may handle it."""


def study(*overrides: dict):
    """WEAK merged with `overrides` (nested dicts merged key by key)."""

    def merge(a: dict, b: dict) -> dict:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    cfg = WEAK
    for o in overrides:
        cfg = merge(cfg, o)
    return parse_config(cfg)


@pytest.fixture(scope="module")
def weak(tmp_path_factory):
    """(store, data dir, the weak SFT checkpoint as a checkpoints row)."""
    store = Store(tmp_path_factory.mktemp("store"))
    cfg = study()
    data_dir = data.run(store, cfg)
    run_dir = sft.run(store, cfg, model.run(store, cfg), data_dir)
    start = pl.read_parquet(Path(run_dir) / "checkpoints.parquet").filter(pl.col("step") == 30).to_dicts()[0]
    return store, Path(data_dir), start


# ---------------------------------------------------------------------------- equations (§3.3-§3.5)


def test_gae_by_hand_with_success_and_truncation():
    # two environments, T = 3; gamma 0.9, lambda 0.95 (gamma*lambda = 0.855)
    rewards = torch.tensor([[-1.0, -3.0], [5.0, -1.0], [-2.0, -2.0]])
    values = torch.tensor([[0.5, 0.1], [1.0, -0.5], [0.2, 0.3]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # env 0 succeeds at t = 1
    truncations = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # env 1 truncates at t = 1
    next_value = torch.tensor([0.4, 0.0])
    # env 0: A2 = -2 + .9*.4 - .2 = -1.84; A1 = 5 - 1 = 4 (m2 = 0); A0 = (-1 + .9*1 - .5) + .855*4 = 2.82
    # env 1, truncation keeps the mask: A2 = -2 - .3 = -2.3; A1 = (-1 + .9*.3 + .5) + .855*(-2.3) = -2.1965;
    #   A0 = (-3 + .9*(-.5) - .1) + .855*(-2.1965) = -5.4280075
    adv, ret = ppo.gae(rewards, values, dones, truncations, next_value, 0.9, 0.95)
    expected = torch.tensor([[2.82, -5.4280075], [4.0, -2.1965], [-1.84, -2.3]])
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, expected + values)
    # cut_gae_at_truncation: m2 = 0 for env 1 -> A1 = -1 + .5 = -0.5; A0 = -3.55 + .855*(-.5) = -3.9775
    adv, _ = ppo.gae(rewards, values, dones, truncations, next_value, 0.9, 0.95, cut_at_truncation=True)
    torch.testing.assert_close(adv[:, 1], torch.tensor([-3.9775, -0.5, -2.3]))
    torch.testing.assert_close(adv[:, 0], expected[:, 0])  # env 0 has no truncation


def test_clipped_policy_and_value_losses_by_hand():
    ratio = torch.tensor([1.0, 1.2, 0.8, 12.0, 12.0, 0.5])
    adv = torch.tensor([2.0, 2.0, -1.0, 1.0, -1.0, -1.0])
    # -min(rho A, clip(rho, .9, 1.1) A); rho > 10 -> -clip(rho) A: 12 x (-1) gives 1.1, not 12
    expected = torch.tensor([-2.0, -2.2, 0.9, -1.1, 1.1, 0.9])
    torch.testing.assert_close(ppo.policy_loss(ratio, adv, 0.1), expected)
    # V_clip = V_old + clip(V - V_old, +-.1); 0.5 max((V - R)^2, (V_clip - R)^2)
    v, v_old, ret = torch.tensor([1.0, 0.5, -2.0]), torch.tensor([0.8, 0.5, -1.0]), torch.tensor([2.0, 0.0, -1.5])
    torch.testing.assert_close(ppo.value_loss(v, v_old, ret, 0.1), torch.tensor([0.605, 0.125, 0.125]))


def test_cosine_learning_rate():
    p = parse_config({"name": "t"}).rl.ppo  # eta_0 1e-6, eta_min 1e-9
    assert ppo.cosine_lr(0, p, 100) == pytest.approx(1e-6)
    assert ppo.cosine_lr(50, p, 100) == pytest.approx((1e-6 + 1e-9) / 2)
    assert ppo.cosine_lr(100, p, 100) == pytest.approx(1e-9)
    assert ppo.cosine_lr(29, p, 100) == pytest.approx(8.1e-7, rel=0.01)  # the authors' RL_End lr (§3.6)


def test_value_head_is_h_to_h4_to_h8_to_1():
    head = ppo.ValueHead(64)
    shapes = [tuple(m.weight.shape) for m in head.net if isinstance(m, torch.nn.Linear)]
    assert shapes == [(16, 64), (8, 16), (1, 8)]
    assert [type(m).__name__ for m in head.net] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert head(torch.randn(5, 64)).shape == (5,)


def test_advantage_histogram_layout():
    adv = [-11.0, -10.0, -9.9, 0.0, 9.99, 10.0, 10.5]
    out = common.advantage_distribution(adv, bins=4, limit=10.0)
    # [underflow, [-10,-5), [-5,0), [0,5), [5,10], overflow]
    assert out["adv_hist"] == [1, 2, 0, 1, 2, 1]
    assert out["adv_q50"] == 0.0 and out["adv_q01"] < -10


# ---------------------------------------------------------------------------- sequence score (§3.4)


def test_split_index_from_character_offsets_on_the_tiny_tokenizer():
    tok = model.build_tokenizer(GP)
    answer = encode(tok, reference_answer(deal("id", 0, 3))) + [tok.eos_token_id]
    s = ppo.split_index(tok, answer)
    # the token holding the opening quote of `"formula":` (here one token ends with the value's opening quote)
    assert tok.decode([answer[s]]) == ',\n  "formula": "'
    # the LAST occurrence counts
    twice = encode(tok, 'Sure. "formula": "1+1" then ') + answer
    assert ppo.split_index(tok, twice) == len(twice) - len(answer) + s
    # character offsets, not token ids: the key spelled character by character is found too
    spelled = encode(tok, '{"cards": 1, ') + [tok.convert_tokens_to_ids(c) for c in '"formula": "4*6*1*1"}']
    k = ppo.split_index(tok, spelled)
    assert tok.decode([spelled[k]]) == '"' and tok.decode(spelled[k:]).startswith('"formula":')
    no_key = encode(tok, "I do not know the answer to this one.")
    assert len(no_key) >= 7 and ppo.split_index(tok, no_key) == len(no_key) - 5
    assert ppo.split_index(tok, encode(tok, "no")) == 1  # n < 7, no key
    assert ppo.split_index(tok, encode(tok, '"formula": "1"')) == 1  # clamped: o_0 is never scored


def test_sequence_score_is_the_generation_log_probability(tmp_path):
    """The teacher-forced pass scores exactly what generate() sampled: sum over i >= 1 of
    log softmax(z_i / tau)[o_i] with z_i generate's own raw logits (left padding and all)."""
    cfg = parse_config({"name": "t"})
    build_tiny(tmp_path, cfg)
    tok, model = lm.load_tokenizer(tmp_path), lm.load_model(tmp_path).eval()
    decoding = {**cfg.rl.decoding.resolved(), "temperature": 0.7, "max_new_tokens": 12}
    gen = Generator(model, tok, decoding, cfg.chat.date_string)
    prompts = [gen.prompt_ids([{"role": "user", "content": render_prompt(deal("id", 0, i))}]) for i in range(3)]
    prompts[1] = prompts[1][:-9]  # different lengths -> left padding
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=(torch.arange(width) >= torch.tensor([[width - len(p)] for p in prompts])).long(), generation_config=gen.config, output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits, 1).float() / 0.7
    steps, expected = [], []
    for b, p in enumerate(prompts):
        response = out.sequences[b, width:].tolist()
        n = len(response) if tok.eos_token_id not in response else response.index(tok.eos_token_id) + 1
        steps.append(Step(p, response[:n], 0.0, False, False, "no_solution", False))
        lp = torch.log_softmax(logits[b, :n], -1).gather(-1, torch.tensor(response[:n])[:, None]).squeeze(-1)
        expected.append(lp[1:].sum())  # o_0 never scored
    head = ppo.ValueHead(ppo.hidden_size(model))
    p = cfg.rl.ppo.model_copy(update={"thought_coef": 1.0})
    L, V = ppo.sequence_scores(model, head, steps, [1] * 3, 0.7, p)
    torch.testing.assert_close(L, torch.stack(expected), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(V, ppo.values_of(model, head, prompts), rtol=1e-5, atol=1e-5)  # V at the last prompt token


def test_sequence_score_weights_thought_and_action_at_the_real_split(tmp_path):
    """L = thought_coef * sum_{i=2}^{s-1} l_i + sum_{i=s}^{n-1} l_i (training.md §3.4) with real
    splits s > 2, checked against l_i computed by hand from each sample's own unpadded forward
    pass. The l_i of this untrained model are about -ln(vocab) ~ -5.8, so weighting the thought
    by 1 (or 0), scoring o_0 or o_1, or moving the split by one token each changes L by
    nats; the test asserts that each of those wrong formulas misses."""
    cfg = parse_config({"name": "t"})
    build_tiny(tmp_path, cfg)
    tok, model = lm.load_tokenizer(tmp_path), lm.load_model(tmp_path).eval()
    gen = Generator(model, tok, cfg.rl.decoding.resolved(), cfg.chat.date_string)
    answer = encode(tok, reference_answer(deal("id", 0, 3))) + [tok.eos_token_id]
    responses = [
        answer,  # the key near the end: s = 24 of n = 33
        encode(tok, "Let me count: 10, 5, 9, 10. ") + answer,  # a longer thought
        encode(tok, "I do not know how to make 24 from these."),  # no key: s = n - 5
    ]
    prompts = [gen.prompt_ids([{"role": "user", "content": render_prompt(deal("id", 0, i))}]) for i in range(3)]
    prompts[1] = prompts[1][:-7]  # different lengths: left padding in the batch
    splits = [ppo.split_index(tok, r) for r in responses]
    assert all(s > 2 for s in splits) and len(set(splits)) == 3 and splits[2] == len(responses[2]) - 5, splits
    tau, p = 0.7, cfg.rl.ppo
    assert p.thought_coef == 0.5  # the authors' weight (§3.4), the default
    steps = [Step(q, r, 0.0, False, False, "no_solution", False) for q, r in zip(prompts, responses)]
    L, _ = ppo.sequence_scores(model, ppo.ValueHead(ppo.hidden_size(model)), steps, splits, tau, p)

    def l_of(prompt, response):  # l_i for i = 0..n-1 from this sample alone
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
        z = logits[len(prompt) - 1 : len(prompt) + len(response) - 1] / tau  # z_i predicts o_i
        return torch.log_softmax(z, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)

    ls = [l_of(q, r) for q, r in zip(prompts, responses)]
    assert all(float(lv.max()) < -1.0 for lv in ls)  # every term matters

    def score(weight=0.5, first=2, shift=0):
        return torch.stack([weight * lv[first : s + shift].sum() + lv[s + shift :].sum() for lv, s in zip(ls, splits)]).float()

    torch.testing.assert_close(L, score(), rtol=1e-5, atol=1e-4)
    wrong = {"thought weight 1": score(weight=1.0), "no thought": score(weight=0.0), "o_1 scored": score(first=1), "o_0 scored": score(first=0), "split one later": score(shift=1), "split one earlier": score(shift=-1)}
    for what, value in wrong.items():
        assert (value - L).abs().min() > 0.1, what


def test_a_hands_prompt_has_the_same_token_ids_in_every_stage():
    """training.md §0: SFT rows, PPO rollouts, GRPO prompts and evaluation."""
    tok = model.build_tokenizer(GP)
    date = parse_config({"name": "t"}).chat.date_string
    messages = [{"role": "user", "content": render_prompt(deal("id", 0, 5))}]
    sft_ids, n_prompt = prompt_completion_ids(tok, messages, [{"role": "assistant", "content": "x"}], date)
    ppo_ids = Generator(torch.nn.Linear(1, 1), tok, parse_config({"name": "t"}).rl.decoding.resolved(), date).prompt_ids(messages)
    eval_ids = lm.ModelGenerator(torch.nn.Linear(1, 1), tok, parse_config({"name": "t"}).eval.decoding.resolved(), date).prompt_ids(messages)
    grpo_ids = grpo.trl_prompt_ids(tok, messages, {"date_string": date})
    assert sft_ids[:n_prompt] == ppo_ids == eval_ids == grpo_ids
    assert grpo.prompt_column(tok, parse_config({"name": "t"}), messages) == messages  # TRL renders it itself


# ---------------------------------------------------------------------------- environments (§3.2, GP §2)


def test_environments_take_hands_in_order_of_need_and_skip_evaluation_hands():
    cfg = parse_config({"name": "t", "rl": {"seed": 3}})
    skip = {overlap_key(deal("id", 3, 1), "ordered")}
    envs = Envs(GP, 2, lambda i: common.example_stream(cfg, skip, i), 3, "exact", 2)
    assert [ep.hand.index for ep in envs.episodes] == [0, 2]  # index 1 is an evaluation hand
    right = reference_answer(envs.episodes[1].hand)
    assert envs.step(0, "no idea")[1] is False  # graded failure 1 of 2
    score, finished, success = envs.step(1, right)
    assert (score.reward, finished, success) == (5, True, True)  # success: env 1 takes the next hand at once
    assert [ep.hand.index for ep in envs.episodes] == [0, 3]
    envs.step(0, "still no idea")  # graded failure 2 of 2 -> the truncation step comes next
    assert envs.episodes[0].truncation_pending
    saved = json.loads(json.dumps(envs.state()))  # a resume point is plain data
    again = Envs(GP, 2, lambda i: common.example_stream(cfg, skip, i), 3, "exact", 2)
    again.restore(saved)
    assert again.conversations() == envs.conversations() and again.next_index == envs.next_index == 4
    score, finished, _ = again.step(0, "anything")
    assert (score.reward, score.truncated, finished, _) == (-1.0, True, True, False)
    assert again.episodes[0].hand.index == 4


class ScriptedGenerator:
    """A rollout generator double: scripted texts, one per environment and round."""

    def __init__(self, texts):
        self.texts = iter(texts)

    def prompt_ids(self, messages):
        return [len(messages)]

    def text(self, response):
        return response[0]

    def __call__(self, prompts):
        return [[next(self.texts)] for _ in prompts]


def test_rollout_steps_tell_a_truncation_from_a_termination():
    """GP §8 in RL: two graded failures, the ungraded step (truncated, not terminal), then a
    solved hand (terminal); the success rate counts solved over finished episodes."""
    cfg = parse_config({"name": "t", "rl": {"seed": 3}})
    envs = Envs(GP, 1, lambda i: common.example_stream(cfg, set(), i), 3, "exact", 2)
    steps, _ = rollout(envs, ScriptedGenerator(["no idea", "no", "anything"]), 3)
    right = reference_answer(envs.episodes[0].hand)
    more, _ = rollout(envs, ScriptedGenerator([right]), 1)
    flags = [(s.done, s.truncated, s.finished, s.success) for s in steps + more]
    assert flags == [(False, False, False, False)] * 2 + [(False, True, True, False), (True, False, True, True)]
    assert success_rate(steps + more) == 0.5 and success_rate(steps[:2]) is None


# ---------------------------------------------------------------------------- real runs


def first_attempt_reward(path, cfg, greedy: bool = False, n: int = 256) -> tuple[float, int]:
    """(mean first-attempt reward, hands solved) on n ID hands of another training seed
    (never evaluation hands, not the run's own stream), sampled with the run's decoding
    and a fixed seed, or greedy: the same hands and random numbers for every model."""
    tok, model = lm.load_tokenizer(path), lm.load_model(path).eval()
    decoding = {**cfg.rl.decoding.resolved(), **({"do_sample": False} if greedy else {})}
    generate = Generator(model, tok, decoding, cfg.chat.date_string)
    hands = list(itertools.islice(training_stream(GP, 999, common.evaluation_keys(cfg), cfg.data.overlap), n))
    torch.manual_seed(0)
    rewards = []
    for k in range(0, n, 64):
        chunk = hands[k : k + 64]
        responses = generate([generate.prompt_ids([{"role": "user", "content": render_prompt(h)}]) for h in chunk])
        rewards += [score(generate.text(r), h).reward for r, h in zip(responses, chunk)]
    return sum(rewards) / n, sum(r == 5 for r in rewards)


def ppo_gain(store, data_dir, start, cfg, greedy: bool = False) -> tuple[float, float, Path]:
    run_dir = Path(rl.run(store, cfg, start, data_dir))
    last = pl.read_parquet(run_dir / "checkpoints.parquet")["path"][-1]
    return first_attempt_reward(start["path"], cfg, greedy)[0], first_attempt_reward(last, cfg, greedy)[0], run_dir


class Recorder:
    """Watches one PPO run from outside: the ratio rho of every micro-batch of the update
    epochs (with which samples have a policy term, n > 1 and a finite L), and at each save
    the in-memory model's logits and value on a fixed input, for checks against the logged
    statistics and the saved checkpoints."""

    def __init__(self, monkeypatch, probe: torch.Tensor):
        self.probe, self.ratios, self.saved, self._scored = probe, [], {}, None
        scores, loss, save = ppo.sequence_scores, ppo.policy_loss, ppo.save_checkpoint

        def sequence_scores(model, head, steps, splits, tau, p):
            L, V = scores(model, head, steps, splits, tau, p)
            self._scored = torch.tensor([len(s.response) > 1 for s in steps]) & torch.isfinite(L.detach().cpu())
            return L, V

        def policy_loss(ratio, adv, clip):  # called right after the update's sequence_scores
            self.ratios.append((ratio.detach().cpu().clone(), self._scored))
            return loss(ratio, adv, clip)

        def save_checkpoint(store, run, update, model, tok, head, extra):
            with torch.no_grad():
                out = model(input_ids=self.probe, output_hidden_states=True)
                self.saved[update] = (out.logits.clone(), head(out.hidden_states[-1][:, -1]).clone())
            return save(store, run, update, model, tok, head, extra)

        monkeypatch.setattr(ppo, "sequence_scores", sequence_scores)
        monkeypatch.setattr(ppo, "policy_loss", policy_loss)
        monkeypatch.setattr(ppo, "save_checkpoint", save_checkpoint)

    def per_update(self, updates: int) -> list[torch.Tensor]:
        """The scored ratios of each update, all its epochs together (float64)."""
        assert len(self.ratios) % updates == 0
        k = len(self.ratios) // updates
        return [torch.cat([r[m] for r, m in self.ratios[u * k : (u + 1) * k]]).double() for u in range(updates)]


@pytest.fixture(scope="module")
def ppo_run(weak):
    """PPO seed 0 from the weak model, watched by a Recorder: (cfg, run dir, recorder)."""
    store, data_dir, start = weak
    cfg = study(PPO, {"rl": {"seed": 0, "decoding": {"seed": 0}}})
    tok = lm.load_tokenizer(start["path"])
    probe = torch.tensor([Generator(None, tok, cfg.rl.decoding.resolved(), cfg.chat.date_string).prompt_ids([{"role": "user", "content": render_prompt(deal("id", 7, 0))}])])
    with pytest.MonkeyPatch.context() as mp:
        recorder = Recorder(mp, probe)
        run_dir = Path(rl.run(store, cfg, start, data_dir))
    return cfg, run_dir, recorder


# PPO's gain over 10 runs (see the test): smallest 0.85, mean 1.30, sd 0.35.
GAIN_MARGIN = 0.5


def test_ppo_raises_the_id_reward_of_a_weak_sft_model(weak, ppo_run):
    """Mean first-attempt reward on 256 held-out ID hands before and after 12 updates, both
    sampled at the rollout temperature 1 with one fixed seed: an average over 256 samples,
    which moves little when float details move a weight (greedy outputs of this model do
    change: the old greedy test failed on another CPU). PPO learns to cut the tail of long,
    many-violation formulas. Measured, before -> after for PPO seeds 0, 1, 2, 3 (rl.seed =
    decoding.seed), the weak model built and trained with each kernel set:
      AVX-512 (this machine): -5.85 -> -4.55, -3.73, -4.56, -4.83
      AVX2 (ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2): -5.76 -> -4.38, -4.50, -4.55, -4.25
      SSE (ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2), seeds 0, 1: -5.41 -> -4.56, -4.40
    Gains 0.85 to 2.12, mean 1.30, sd 0.35: the margin 0.5 is 2.3 sd under the mean and 0.35
    under the smallest gain; a PPO that learns nothing gains 0 +- 0.3 (two independent
    256-sample means). With another SFT hand stream (data.train_seed 1) the model is much
    less weak (-3.32) and gains only 0.15 to 0.30: the margin is this fixture's, not any
    weak model's."""
    store, data_dir, start = weak
    cfg, run_dir, _ = ppo_run
    assert cfg.rl.decoding.resolved()["do_sample"] and cfg.rl.decoding.resolved()["temperature"] == 1.0  # rollouts and both evaluations sample
    last = pl.read_parquet(run_dir / "checkpoints.parquet")["path"][-1]
    before, after = first_attempt_reward(start["path"], cfg)[0], first_attempt_reward(last, cfg)[0]
    print(f"PPO from the weak model, seed 0: first-attempt reward {before:.3f} -> {after:.3f}")
    assert after > before + GAIN_MARGIN, (before, after)


def test_ppo_run_tables_checkpoints_and_logged_statistics(weak, ppo_run):
    """The tables of a PPO run, its checkpoints against the model it had in memory, and the
    logged PPO statistics against a recomputation from the ratios the update used (§3.5)."""
    store, data_dir, start = weak
    cfg, run_dir, recorder = ppo_run
    p, updates = cfg.rl.ppo, cfg.rl.num_updates
    log = pl.read_parquet(run_dir / "rl_log.parquet")
    assert log.schema == pl.Schema(common.log_schema(GP.outcomes))
    assert log["update"].to_list() == list(range(1, updates + 1))
    assert set(log["rl_start_step"]) == {start["step"]} and set(log["parent"]) == {start["ckpt_id"]}
    n = sum(log.row(0, named=True)[f"count_{o}"] for o in OUTCOMES)
    assert n == p.num_envs * p.steps_per_env and all(len(h) == 40 + 2 and sum(h) == n for h in log["adv_hist"])
    # the learning rate of every update is the cosine of §3.5 (T_max = num_updates)
    assert log["learning_rate"].to_list() == pytest.approx([ppo.cosine_lr(u, p, updates) for u in range(updates)], rel=1e-9)
    # approx_kl = mean(rho - 1 - ln rho), clip_fraction = share of |rho - 1| > eps, over the scored
    # samples of all epochs of the update. Epochs 2-4 see a policy the first step moved, so the
    # KL is > 0 in every update, and early updates clip.
    for u, ratio in enumerate(recorder.per_update(updates)):
        assert log["approx_kl"][u] == pytest.approx(float((ratio - 1 - ratio.log()).mean()), rel=1e-3, abs=1e-7)
        assert log["clip_fraction"][u] == pytest.approx(float(((ratio.float() - 1).abs() > p.clip).double().mean()))
        assert log["approx_kl"][u] > 0
    assert log["clip_fraction"][0] > 0.05

    ckpts = pl.read_parquet(run_dir / "checkpoints.parquet")
    assert ckpts["ckpt_id"].to_list() == [f"rl-{start['step']}-{u}" for u in cfg.rl.save_steps]
    assert ckpts["path"][0] == start["path"] and ckpts["content_hash"][0] == start["content_hash"]  # registered, not copied
    assert set(ckpts["parent"]) == {start["ckpt_id"]} and ckpts["content_hash"].n_unique() == 3
    first = load_file(Path(start["path"]) / "model.safetensors")
    assert sorted(recorder.saved) == cfg.rl.save_steps[1:]
    for update, path in zip(cfg.rl.save_steps[1:], ckpts["path"][1:]):
        path = Path(path)
        assert store.is_sealed(path)
        weights = load_file(path / "model.safetensors")
        assert sorted(weights) == sorted(first) and all(not torch.equal(weights[k], first[k]) for k in first)  # every tensor trained
        # a plain HF directory that reloads as the model PPO had in memory at that update
        logits, value = recorder.saved[update]
        hf = AutoModelForCausalLM.from_pretrained(path).eval()
        head = ppo.ValueHead(ppo.hidden_size(hf))
        head.load_state_dict(load_file(path / rl.VALUE_HEAD))
        with torch.no_grad():
            out = hf(input_ids=recorder.probe, output_hidden_states=True)
            torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-6)
            torch.testing.assert_close(head(out.hidden_states[-1][:, -1]), value, rtol=0, atol=1e-6)
    assert not Store.from_path(run_dir).work_dir.exists()  # resume state dropped once sealed
    assert Path(rl.run(store, cfg, start, data_dir)) == run_dir  # a second call is a cache hit
    assert rl.collect([run_dir, run_dir])["rl_log"].height == 2 * updates  # the study-wide tables


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ppo_raises_the_id_reward_over_seeds(weak, seed):
    store, data_dir, start = weak
    before, after, _ = ppo_gain(store, data_dir, start, study(PPO, {"rl": {"seed": seed, "decoding": {"seed": seed}}}))
    print(f"PPO from the weak model, seed {seed}: first-attempt reward {before:.3f} -> {after:.3f}")
    assert after > before + GAIN_MARGIN, (before, after)


# A tiny model that has learned to read the cards (640 SFT steps, about a minute on 2 cores):
# most answers use the right numbers (-1), a few solve the hand.
READER = {"data": {"train_size": 640 * 32}, "sft": {"save_steps": [0, 640], "learning_rate": 3e-3}}


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("reader"))
    cfg = study(READER)
    data_dir = data.run(store, cfg)
    run_dir = sft.run(store, cfg, model.run(store, cfg), data_dir)
    return store, Path(data_dir), pl.read_parquet(Path(run_dir) / "checkpoints.parquet").to_dicts()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_raises_the_reward_of_a_model_that_reads_the_cards(reader, seed):
    """Sampled first attempts (temperature 1, as the rollouts) on 256 held-out ID hands before
    and after 16 updates at lr 1e-4. Measured (AVX-512 kernels) for seeds 0, 1, 2: -2.31 ->
    -2.04, -2.07, -2.04 (hands solved 2 -> 4, 3, 4; greedy -1.79 -> -1.38, -1.46, -1.46).
    The margin is half the smallest gain (0.24). Solved counts (2-4 of 256) are too few to
    assert on; the greedy figures hinge on float details (see the weak model's test)."""
    store, data_dir, start = reader
    cfg = study(READER, PPO, {"rl": {"seed": seed, "decoding": {"seed": seed}, "save_steps": [0, 16], "ppo": {"learning_rate": 1e-4}}})
    run_dir = Path(rl.run(store, cfg, start, data_dir))
    last = pl.read_parquet(run_dir / "checkpoints.parquet")["path"][-1]
    (before, solved_before), (after, solved_after) = first_attempt_reward(start["path"], cfg), first_attempt_reward(last, cfg)
    greedy_before, greedy_after = first_attempt_reward(start["path"], cfg, True), first_attempt_reward(last, cfg, True)
    print(f"PPO from the reader, seed {seed}: sampled first-attempt reward {before:.3f} -> {after:.3f}, solved {solved_before} -> {solved_after}; greedy {greedy_before} -> {greedy_after}")
    assert after > before + 0.12, (before, after, solved_before, solved_after)


def test_grpo_two_steps_writes_its_checkpoint(weak):
    store, data_dir, start = weak
    cfg = study({"rl": {"algorithm": "grpo", "save_steps": [0, 2], "grpo": {"per_device_batch_size": 4, "num_generations": 2, "decoding": {"max_new_tokens": 48}, "learning_rate": 1e-3}}})
    run_dir = Path(rl.run(store, cfg, start, data_dir))
    ckpts = pl.read_parquet(run_dir / "checkpoints.parquet")
    assert ckpts["ckpt_id"].to_list() == ["rl-30-0", "rl-30-2"]
    last = Path(ckpts["path"][-1])
    assert store.is_sealed(last) and AutoModelForCausalLM.from_pretrained(last) is not None
    log = pl.read_parquet(run_dir / "rl_log.parquet")
    assert log["update"].to_list() == [1, 2] and set(log["algorithm"]) == {"grpo"}
    assert log["reward_mean"].is_not_null().all() and all(sum(h) == 4 for h in log["adv_hist"])


def test_grpo_resumes_from_its_last_trainer_checkpoint(weak, tmp_path, monkeypatch, caplog):
    _, data_dir, start = weak
    cfg = study({"rl": {"algorithm": "grpo", "save_steps": [0, 1, 3], "grpo": {"per_device_batch_size": 4, "num_generations": 2, "decoding": {"max_new_tokens": 48}, "learning_rate": 1e-3}}})
    reference = Path(rl.run(Store(tmp_path / "reference"), cfg, start, data_dir))
    store = Store(tmp_path / "store")
    on_save = sft.StepCheckpoints.on_save

    def save_then_die(self, args, state, control, **kw):
        on_save(self, args, state, control, **kw)
        raise Killed(f"killed after saving step {state.global_step}")

    monkeypatch.setattr(sft.StepCheckpoints, "on_save", save_then_die)
    with pytest.raises(Killed, match="after saving step 1"):
        rl.run(store, cfg, start, data_dir)
    monkeypatch.setattr(sft.StepCheckpoints, "on_save", on_save)
    with caplog.at_level("INFO", logger="rlheal.rl"):
        run_dir = Path(rl.run(store, cfg, start, data_dir))
    assert "rl resumes from" in caplog.text and "checkpoint-1" in caplog.text
    log = pl.read_parquet(run_dir / "rl_log.parquet")
    assert log["update"].to_list() == [1, 2, 3]
    final = load_file(Path(pl.read_parquet(run_dir / "checkpoints.parquet")["path"][-1]) / "model.safetensors")
    expected = load_file(Path(pl.read_parquet(reference / "checkpoints.parquet")["path"][-1]) / "model.safetensors")
    assert any(not torch.equal(expected[k], v) for k, v in load_file(Path(start["path"]) / "model.safetensors").items())  # it learned
    for k in expected:
        torch.testing.assert_close(final[k], expected[k], rtol=1e-5, atol=1e-6)


def test_starting_steps_follow_from_steps():
    both = {"sft": {"save_steps": [0, 10, 30]}}
    assert rl.start_steps(study(both, {"rl": {"from_steps": "all"}})) == [0, 10, 30]  # the base among them
    assert rl.start_steps(study(both, {"rl": {"from_steps": [30]}})) == [30]


def test_the_stage_obeys_fault_injection(weak, monkeypatch):
    store, data_dir, start = weak
    monkeypatch.setenv("RLHEAL_FAULT", "rl")
    art = rl.artifact(store, study(QUICK), start, Store.from_path(data_dir))
    with pytest.raises(InjectedFault):
        rl.stage.fn(artifact=art, cfg=study(QUICK), ckpt=start, start_step=30, data=str(data_dir))


def _final_weights(run_dir: Path) -> dict:
    path = Path(pl.read_parquet(run_dir / "checkpoints.parquet")["path"][-1])
    return {**load_file(path / "model.safetensors"), **{f"v.{k}": v for k, v in load_file(path / rl.VALUE_HEAD).items()}}


@pytest.fixture(scope="module")
def uninterrupted(weak, tmp_path_factory):
    """QUICK run start to end, in a store of its own: the reference for the resume tests."""
    _, data_dir, start = weak
    run_dir = Path(rl.run(Store(tmp_path_factory.mktemp("reference")), study(QUICK), start, data_dir))
    return _final_weights(run_dir), pl.read_parquet(run_dir / "rl_log.parquet")


def test_interrupted_run_resumes_at_its_last_save_and_ends_equal(weak, uninterrupted, tmp_path, monkeypatch, caplog):
    _, data_dir, start = weak
    store, cfg = Store(tmp_path), study(QUICK)
    save = common.save_resume

    def save_then_die(run, update, state):
        save(run, update, state)
        raise Killed(f"killed after saving update {update}")

    monkeypatch.setattr(common, "save_resume", save_then_die)
    with pytest.raises(Killed, match="after saving update 2"):
        rl.run(store, cfg, start, data_dir)
    monkeypatch.setattr(common, "save_resume", save)
    assert not store.is_sealed(rl.artifact(store, cfg, start, Store.from_path(data_dir)))

    with caplog.at_level("INFO", logger="rlheal.rl"):
        run_dir = Path(rl.run(store, cfg, start, data_dir))
    assert "rl resumes from update 2" in caplog.text
    reference, reference_log = uninterrupted
    final = _final_weights(run_dir)
    for k in reference:
        torch.testing.assert_close(final[k], reference[k], rtol=1e-5, atol=1e-6)
    log = pl.read_parquet(run_dir / "rl_log.parquet")
    assert log["update"].to_list() == [1, 2, 3, 4]
    assert log["reward_mean"].to_list() == reference_log["reward_mean"].to_list()  # the same episodes, resumed


KILL_SCRIPT = """
import json, sys
from pathlib import Path
from rlheal.config import ConfigError, parse_config
from rlheal.store import Store
from tasks import rl
cfg = parse_config(json.loads(sys.argv[1]))
rl.run(Store(sys.argv[2]), cfg, json.loads(sys.argv[3]), Path(sys.argv[4]))
"""


def test_kill_9_mid_run_then_resume(weak, uninterrupted, tmp_path):
    """A real `kill -9` of a process running rl.run once update 2 is saved; the re-run
    resumes there and ends where the uninterrupted run ends."""
    _, data_dir, start = weak
    cfg = study(QUICK)
    store_dir = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg.model_dump()), str(store_dir), json.dumps(start), str(data_dir)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # update 2 saved: kill during update 3 (an update takes far longer than one poll)
    kill_when(proc, lambda: any((store_dir / "rl" / ".work").glob("*/resume-2.pt")), "its first save")
    store = Store(store_dir)
    assert not store.is_sealed(rl.artifact(store, cfg, start, Store.from_path(data_dir)))

    run_dir = Path(rl.run(store, cfg, start, data_dir))
    reference, _ = uninterrupted
    final = _final_weights(run_dir)
    for k in reference:
        torch.testing.assert_close(final[k], reference[k], rtol=1e-5, atol=1e-6)


def test_value_warmup_trains_the_head_alone_then_the_policy(weak, tmp_path):
    # rl.ppo.value_warmup_updates: the first updates step the value head only. Broken variants
    # this catches: the policy term left on (the backbone moves by update 2), the value loss's
    # gradient left on the shared backbone (it moves too), the head frozen as well (equal at 1
    # and 2), or the warm-up never ending (the backbone still at update 4).
    _, data_dir, start = weak
    cfg = study(QUICK, {"rl": {"save_steps": [0, 1, 2, 3, 4], "ppo": {"value_warmup_updates": 2}}})
    run_dir = Path(rl.run(Store(tmp_path), cfg, start, data_dir))
    at = {r["step"]: Path(r["path"]) for r in pl.read_parquet(run_dir / "checkpoints.parquet").to_dicts()}
    policy = {s: load_file(at[s] / "model.safetensors") for s in (0, 2, 3)}
    assert all(torch.equal(policy[0][k], policy[2][k]) for k in policy[0]), "the policy moved during the value warm-up"
    assert any(not torch.equal(policy[2][k], policy[3][k]) for k in policy[3]), "the policy did not move in the first update after the warm-up"
    # a warm-up update trains no policy: no policy statistics are logged for it
    log = pl.read_parquet(run_dir / "rl_log.parquet").sort("update")
    assert log["approx_kl"].is_null().to_list() == [True, True, False, False] and log["policy_loss"].is_null().to_list() == [True, True, False, False]
    with pytest.raises(ConfigError, match="value_warmup_updates"):
        study(QUICK, {"rl": {"ppo": {"value_warmup_updates": 4}}})
    head = {s: load_file(at[s] / rl.VALUE_HEAD) for s in (1, 2)}
    assert any(not torch.equal(head[1][k], head[2][k]) for k in head[1]), "the head did not train in the warm-up"


@pytest.mark.parametrize("detached", [False, True])
def test_a_detached_critic_moves_the_head_only(tmp_path, detached):
    # rl.ppo.critic_detached: V's gradient stops at the final hidden state. Attached (the
    # authors' design), the same value loss reaches every backbone matrix it depends on.
    cfg = parse_config({"name": "t"})
    build_tiny(tmp_path, cfg)
    tok, model = lm.load_tokenizer(tmp_path), lm.load_model(tmp_path).eval()
    gen = Generator(model, tok, {**cfg.rl.decoding.resolved(), "max_new_tokens": 8}, cfg.chat.date_string)
    prompt = gen.prompt_ids([{"role": "user", "content": render_prompt(deal("id", 0, 0))}])
    head = ppo.ValueHead(ppo.hidden_size(model))
    p = cfg.rl.ppo.model_copy(update={"critic_detached": detached})
    _, V = ppo.sequence_scores(model, head, [Step(prompt, [5, 6, 7, 8], 0.0, False, False, "no_solution", False)], [1], 1.0, p)
    V.sum().backward()
    backbone = [w.grad for name, w in model.named_parameters() if "layers." in name]
    assert head.net[-1].bias.grad is not None and head.net[-1].bias.grad.abs().sum() > 0  # the critic still learns
    assert (all(g is None or not g.any() for g in backbone)) == detached


def test_a_ppo_switch_that_is_off_leaves_the_run_key_unchanged():
    # runs sealed before rl.ppo.critic_detached existed stay cache hits while it is off
    start = {"ckpt_id": "sft-30", "step": 30, "content_hash": "x"}
    off, on = (rl.key_config(study(QUICK, {"rl": {"ppo": {"critic_detached": d}}}), start) for d in (False, True))
    assert "critic_detached" not in off["rl"]["ppo"] and on["rl"]["ppo"]["critic_detached"] is True
    assert rl.key_config(study(QUICK), start) == off
