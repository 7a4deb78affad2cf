"""The evaluation stage: the episode loop with a scripted generator, then a real tiny
checkpoint end to end (batched greedy generation, the tables, the cache)."""

import dataclasses
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch

from rlheal.config import parse_config
from rlheal.store import Store
from tasks import data, eval, lm, model
from tasks.model import build_tiny
from tasks.chat import prompt_completion_ids
from tasks.eval import play
from tasks.lm import Generation
from tasks.eval import wilson_interval
from tasks.generalpoints import OUTCOMES, deal, make_hand, render_prompt
from tasks.generalpoints.prompt import answer_block
from tests.conftest import GP

CFG = {
    "name": "t",
    "data": {"train_size": 64, "eval_size": 8},
    "sft": {"save_steps": [0, 1], "batch_size": 8, "per_device_batch_size": 8},
    "eval": {"batch_size": 64, "ce_hands": 8, "decoding": {"max_new_tokens": 40}},
}


def R(formula: str, cards=("4", "6", "A", "A"), numbers=(4, 6, 1, 1)) -> str:
    """A response that is the answer block with formula text `formula` (GP §10)."""
    return answer_block(list(cards), list(numbers), formula + "=24")


class Scripted:
    """A generator double: the response to each hand's attempt t is script[prompt][t-1].
    Keeps every batch of conversations it was asked to answer."""

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.calls = script, []

    def __call__(self, conversations):
        self.calls.append(conversations)
        out = []
        for messages in conversations:
            attempt = sum(m["role"] == "assistant" for m in messages) + 1
            out.append(Generation(self.script[messages[0]["content"]][attempt - 1], tokens=7 * attempt))
        return out


def hand(cards, index, split="id"):
    return dataclasses.replace(make_hand(cards, split), index=index)


# Four hands and what the "model" answers on each attempt (GP §10 rows for the rewards).
A = hand(["4", "6", "A", "A"], 0)  # correct on attempt 1
B = hand(["3", "3", "8", "8"], 1)  # no formula, wrong numbers, then 8/(3-8/3): correct only in exact arithmetic
C = hand(["J", "2", "A", "A"], 2)  # never a formula
D = hand(["5", "5", "5", "A"], 3)  # always a formula missing numbers
SCRIPT = {
    render_prompt(A): [R("4*6*1*1")],
    render_prompt(B): ["I think it is 8/(3-8/3).", R("3*3*8"), R("8/(3-8/3)")],
    render_prompt(C): ["no idea"] * 5,
    render_prompt(D): [R("5*5")] * 5,
}


def episodes(hands, mode="exact"):
    return [GP.episode(h, mode, 5) for h in hands]


def played_attempts(hands=(A, B, C, D), script=SCRIPT, batch_size=3, mode="exact"):
    played = play(episodes(hands, mode), Scripted(script), batch_size)
    return played, eval.attempts_table(GP, played, "ckpt", "id", "reference" if mode == "exact" else "exact")


# ---------------------------------------------------------------------------- the episode loop


def test_episode_rewards_attempts_and_success_per_hand():
    played, attempts = played_attempts()
    a, b, c, d = played.episodes
    assert (a.attempts, a.success) == (1, True)
    assert (b.attempts, b.success) == (3, True)
    assert (c.attempts, c.success) == (5, False)  # always wrong: verify_iter attempts, no success
    assert (d.attempts, d.success) == (5, False)
    by_hand = attempts.group_by("hand_index", maintain_order=True).agg("reward", "format_error", "outcome", "reward_other_mode")
    rows = {r["hand_index"]: r for r in by_hand.to_dicts()}
    assert rows[0]["reward"] == [5.0]
    assert rows[1]["reward"] == [-3.0, -2.0, 5.0]
    assert rows[1]["format_error"] == [True, False, False]
    assert rows[1]["reward_other_mode"] == [-3.0, -2.0, 0.0]  # 8/(3-8/3) is 23.999... in floats
    assert rows[2]["reward"] == [-3.0] * 5 and all(rows[2]["format_error"])
    assert rows[2]["outcome"] == ["illegal_formula"] * 5
    assert rows[3]["reward"] == [-2.0] * 5 and rows[3]["outcome"] == ["incorrect_number"] * 5
    assert attempts["attempt"].to_list() == [1, 1, 2, 3, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    assert attempts["generated_tokens"].to_list()[:4] == [7, 7, 14, 21]
    assert attempts.schema == pl.Schema(eval.attempts_schema(GP))


def test_attempt_two_sees_the_raw_output_and_the_failure_message():
    gen = Scripted(SCRIPT)
    play(episodes([B]), gen, batch_size=4)
    first, second, third = (call[0] for call in gen.calls)
    assert first == [{"role": "user", "content": render_prompt(B)}]
    assert second == [
        {"role": "user", "content": render_prompt(B)},
        {"role": "assistant", "content": "I think it is 8/(3-8/3)."},
        {"role": "user", "content": "You failed this trial because illegal characters."},
    ]
    assert third[3] == {"role": "assistant", "content": R("3*3*8")}
    assert third[4] == {"role": "user", "content": "You failed this trial because you didn't use numbers: [8]."}


def test_finished_episodes_drop_out_and_batches_are_chunked():
    gen = Scripted(SCRIPT)
    play(episodes([A, B, C, D]), gen, batch_size=3)
    sizes = [len(call) for call in gen.calls]
    # round 1: 4 episodes in chunks of 3 and 1; round 2: A is done; rounds 3..: B then C, D
    assert sizes == [3, 1, 3, 3, 2, 2]


def test_summary_by_hand():
    _, attempts = played_attempts()
    s = eval.summarize(GP, attempts).row(0, named=True)
    # n = 4 hands, k = 2 solved (A on attempt 1, B on attempt 3), A = 1 + 3 + 5 + 5 attempts
    assert (s["n"], s["k"], s["attempts"]) == (4, 2, 14)
    assert s["accuracy"] == 0.5 and s["first_attempt_accuracy"] == 0.25
    assert (s["accuracy_ci_low"], s["accuracy_ci_high"]) == pytest.approx(wilson_interval(2, 4))
    assert (s["first_attempt_accuracy_ci_low"], s["first_attempt_accuracy_ci_high"]) == pytest.approx(wilson_interval(1, 4))
    assert s["accuracy_ci_low"] < s["accuracy"] < s["accuracy_ci_high"]
    assert s["mean_attempts_to_success"] == 2.0
    assert s["format_error_rate"] == 6 / 14  # B's first attempt and C's five
    assert s["first_attempt_format_error_rate"] == 2 / 4
    counts = {"correct": 2, "partial": 0, "no_solution": 0, "incorrect_number": 6, "illegal_formula": 6, "aggregated_error": 0}
    for o in OUTCOMES:
        assert s[f"rate_{o}"] == pytest.approx(counts[o] / 14)
    # authors: one extra -1 step per failed hand: S = 14 + 2, no_solution + 2, correct = k / n
    assert s["authors_rate_correct"] == 0.5
    assert s["authors_rate_no_solution"] == pytest.approx(2 / 16)
    assert s["authors_rate_incorrect_number"] == pytest.approx(6 / 16)
    assert s["authors_rate_illegal_formula"] == pytest.approx(6 / 16)
    assert s["authors_rate_partial"] == 0 and s["authors_rate_aggregated_error"] == 0
    assert s["generated_tokens"] == attempts["generated_tokens"].sum()


def test_reference_mode_drives_the_episode():
    played, attempts = played_attempts(hands=(B,), script={render_prompt(B): SCRIPT[render_prompt(B)] + [R("8/(3-8/3)")] * 2}, mode="reference")
    assert not played.episodes[0].success and played.episodes[0].attempts == 5
    assert attempts["reward"].to_list()[2:] == [0.0, 0.0, 0.0]  # 23.999... earns 0 via the prefix walk
    assert attempts["reward_other_mode"].to_list()[2:] == [5.0, 5.0, 5.0]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate: out of memory")])
def test_out_of_memory_halves_the_batch_and_keeps_the_results(error):
    class Small(Scripted):
        def __call__(self, conversations):
            if len(conversations) > 1:
                raise error
            return super().__call__(conversations)

    played = play(episodes([A, B, C, D]), Small(SCRIPT), batch_size=4)
    assert played.batch_size == 1
    _, reference = played_attempts(batch_size=4)
    assert eval.attempts_table(GP, played, "ckpt", "id", "reference").equals(reference)


def test_other_errors_are_not_swallowed():
    def broken(conversations):
        raise ValueError("bad tokenizer")

    with pytest.raises(ValueError, match="bad tokenizer"):
        play(episodes([A]), broken, batch_size=2)


def test_prefect_task_run_name_names_the_checkpoint_and_split():
    from prefect._internal.engine import resolve_custom_task_run_name

    def name(ckpt):
        return resolve_custom_task_run_name(eval.stage, {"artifact": "x", "cfg": None, "ckpt": ckpt, "split": "ood", "data": "d"})

    assert name({"ckpt_id": "sft-10", "stage": "sft", "step": 10}) == "eval sft step=10 ood"
    assert name({"ckpt_id": "rl-80-20", "stage": "rl", "step": 20, "rl_start_step": 80}) == "eval rl from=80 upd=20 ood"
    assert name({"ckpt_id": "base", "stage": "base", "step": 0}) == "eval base ood"


def test_batch_size_is_in_the_key_only_when_sampling():
    greedy = parse_config(CFG)
    greedy_small = parse_config({**CFG, "eval": {**CFG["eval"], "batch_size": 3}})
    sampled = parse_config({**CFG, "eval": {**CFG["eval"], "decoding": {"preset": "authors_eval_qwen"}}})
    sampled_small = parse_config({**CFG, "eval": {**CFG["eval"], "batch_size": 3, "decoding": {"preset": "authors_eval_qwen"}}})
    assert eval.decoding_key(greedy) == eval.decoding_key(greedy_small)
    assert eval.decoding_key(sampled) != eval.decoding_key(sampled_small)
    config = lm.generation_config(sampled.eval.decoding.resolved(), model.build_tokenizer(GP))
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.repetition_penalty) == (True, 0.7, 0.8, 20, 1.05)
    rl = parse_config({**CFG, "eval": {"decoding": {"preset": "rl_default"}}}).eval.decoding.resolved()
    assert lm.generation_config(rl, model.build_tokenizer(GP)).top_k == 0  # off, not transformers' 50


# ---------------------------------------------------------------------------- a real tiny checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model that has memorised the reference answers of five of the eight ID
    hands (a few seconds of Adam), saved as a checkpoint; plus the data tables."""
    root = tmp_path_factory.mktemp("eval")
    cfg = parse_config(CFG)
    data_dir = Path(data.run(Store(root / "data-store"), cfg))
    base = root / "base"
    base.mkdir()
    build_tiny(base, cfg)
    tok, model = lm.load_tokenizer(base), lm.load_model(base)
    table = pl.read_parquet(data_dir / "eval_set_id.parquet").head(5)
    seqs = [prompt_completion_ids(tok, [{"role": "user", "content": p}], [{"role": "assistant", "content": a}], cfg.chat.date_string) for p, a in zip(table["prompt"], table["answer"])]
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, n) in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)], labels[i, n : len(s)] = torch.tensor(s), 1, torch.tensor(s[n:])
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(200):
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    ckpt_dir = root / "memorised"
    model.save_pretrained(ckpt_dir, safe_serialization=True)
    tok.save_pretrained(ckpt_dir)
    ckpt = {"ckpt_id": "sft-1", "stage": "sft", "step": 1, "parent": "base", "path": str(ckpt_dir), "content_hash": lm.weights_hash(ckpt_dir)}
    return cfg, data_dir, ckpt


def test_end_to_end_tables_are_consistent(tiny, tmp_path):
    cfg, data_dir, ckpt = tiny
    out = eval.run(Store(tmp_path), cfg, ckpt, "id", data_dir)
    attempts = pl.read_parquet(Path(out) / "eval_attempts.parquet")
    summary = pl.read_parquet(Path(out) / "eval_summary.parquet")
    assert attempts.schema == pl.Schema(eval.attempts_schema(GP))
    s = summary.row(0, named=True)
    assert (s["ckpt_id"], s["stage"], s["step"], s["split"], s["n"]) == ("sft-1", "sft", 1, "id", 8)
    per_hand = attempts.group_by("hand_index").agg(solved=(pl.col("reward") == 5).any(), tries=pl.len(), last=pl.col("attempt").max())
    assert per_hand.height == 8 and per_hand["tries"].max() <= cfg.verifier.verify_iter
    assert (per_hand["tries"] == per_hand["last"]).all()
    assert s["accuracy"] == per_hand["solved"].mean() == s["k"] / 8
    assert 0 < s["k"] < 8, "the memorised hands should be solved and the others not"
    assert s["accuracy_ci_low"] <= s["accuracy"] <= s["accuracy_ci_high"]
    # an episode stops at its first success
    assert attempts.filter(pl.col("reward") == 5).join(per_hand, on="hand_index").select((pl.col("attempt") == pl.col("last")).all()).item()
    assert (attempts["generated_tokens"] <= 40).all()
    assert (attempts.filter("hit_max_new_tokens")["generated_tokens"] == 40).all()
    assert s["attempts"] == attempts.height and s["generated_tokens"] == attempts["generated_tokens"].sum()
    assert s["ce"] > 0 and s["eval_set_hash"] == pl.read_parquet(data_dir / "eval_set_id.parquet")["eval_set_hash"][0]
    assert (s["preset"], s["do_sample"], s["max_new_tokens"], s["verifier_mode"], s["batch_size"]) == ("greedy", False, 40, "exact", 64)


def test_greedy_is_deterministic_and_independent_of_batch_size(tiny):
    cfg, data_dir, ckpt = tiny
    table = pl.read_parquet(data_dir / "eval_set_id.parquet")
    tok, model = lm.load_tokenizer(ckpt["path"]), lm.load_model(ckpt["path"])
    first, _ = eval.evaluate_model(model, tok, table, cfg, ckpt)
    again, _ = eval.evaluate_model(model, tok, table, cfg, ckpt)
    small = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"batch_size": 3})})
    chunked, summary = eval.evaluate_model(model, tok, table, small, ckpt)
    assert first.equals(again) and first.equals(chunked)
    assert summary["batch_size_used"][0] == 3
    assert first["generated_tokens"].n_unique() > 1  # rows stop at different lengths, padded after their stop


def test_generator_stops_at_end_of_turn_or_the_token_limit(tiny):
    cfg, data_dir, ckpt = tiny
    table = pl.read_parquet(data_dir / "eval_set_id.parquet")
    tok, model = lm.load_tokenizer(ckpt["path"]), lm.load_model(ckpt["path"])
    conversations = [[{"role": "user", "content": p}] for p in table["prompt"][:2]]
    full = lm.ModelGenerator(model, tok, cfg.eval.decoding.resolved(), cfg.chat.date_string)(conversations)
    # a memorised hand: exactly its reference answer, then <|end|> (counted, not in the text)
    assert full[0].text == table["answer"][0]
    assert full[0].tokens == len(tok(table["answer"][0] + "<|end|>", add_special_tokens=False)["input_ids"])
    assert not full[0].hit_max_new_tokens
    short = {**cfg.eval.decoding.resolved(), "max_new_tokens": 5}
    cut = lm.ModelGenerator(model, tok, short, cfg.chat.date_string)(conversations)
    assert [(g.tokens, g.hit_max_new_tokens) for g in cut] == [(5, True), (5, True)]
    assert table["answer"][0].startswith(cut[0].text)


def test_sampling_is_seeded_per_call_and_leaves_the_global_rng_alone(tiny):
    cfg, data_dir, ckpt = tiny
    sampled = parse_config({**CFG, "eval": {**CFG["eval"], "ce_hands": 0, "decoding": {"preset": "authors_eval_qwen", "max_new_tokens": 16}}})
    table = pl.read_parquet(data_dir / "eval_set_ood.parquet").head(4)
    tok, model = lm.load_tokenizer(ckpt["path"]), lm.load_model(ckpt["path"])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    one, _ = eval.evaluate_model(model, tok, table, sampled, ckpt)
    assert torch.equal(torch.get_rng_state(), state)
    two, _ = eval.evaluate_model(model, tok, table, sampled, ckpt)
    assert one.equals(two)
    reseeded = sampled.model_copy(update={"eval": sampled.eval.model_copy(update={"decoding": sampled.eval.decoding.model_copy(update={"seed": 7})})})
    three, _ = eval.evaluate_model(model, tok, table, reseeded, ckpt)
    assert not one["response"].equals(three["response"])


def test_the_checkpoint_generation_config_is_ignored(tiny, tmp_path):
    cfg, data_dir, ckpt = tiny
    noisy = tmp_path / "noisy"
    shutil.copytree(ckpt["path"], noisy)
    settings = {"do_sample": True, "temperature": 5.0, "top_k": 3, "min_new_tokens": 3, "no_repeat_ngram_size": 1, "repetition_penalty": 3.0, "max_new_tokens": 5}
    (noisy / "generation_config.json").write_text(json.dumps({**settings, "eos_token_id": 2, "pad_token_id": 1}))
    table = pl.read_parquet(data_dir / "eval_set_id.parquet")
    tok, model = lm.load_tokenizer(noisy), lm.load_model(noisy)
    assert model.generation_config.temperature == 5.0  # the file was read...
    # ...and would change the outputs if generate were left to use it
    prompt = lm.ModelGenerator(model, tok, cfg.eval.decoding.resolved(), cfg.chat.date_string).prompt_ids([{"role": "user", "content": table["prompt"][0]}])
    torch.manual_seed(0)
    own = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert own.shape[1] - len(prompt) == 5
    clean = eval.run(Store(tmp_path / "a"), cfg, ckpt, "id", data_dir)
    ignored = eval.run(Store(tmp_path / "b"), cfg, {**ckpt, "path": str(noisy)}, "id", data_dir)
    assert pl.read_parquet(Path(clean) / "eval_attempts.parquet").equals(pl.read_parquet(Path(ignored) / "eval_attempts.parquet"))
    assert model.generation_config.temperature == 5.0  # evaluation put the model's own config back


def test_a_second_run_finds_the_sealed_artifact(tiny, tmp_path, monkeypatch):
    cfg, data_dir, ckpt = tiny
    store = Store(tmp_path)
    first = eval.run(store, cfg, ckpt, "ood", data_dir)
    stamp = (Path(first) / "manifest.json").stat().st_mtime_ns

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr(eval, "load_model", no_loading)
    assert eval.run(store, cfg, ckpt, "ood", data_dir) == first
    assert (Path(first) / "manifest.json").stat().st_mtime_ns == stamp
    assert first == eval.artifact(store, cfg, ckpt, "ood", data_dir).path
    # a different batch size is the same greedy evaluation; another verifier mode is not
    smaller = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"batch_size": 2})})
    assert eval.artifact(store, smaller, ckpt, "ood", data_dir).path == first
    reference = cfg.model_copy(update={"verifier": cfg.verifier.model_copy(update={"mode": "reference"})})
    assert eval.artifact(store, reference, ckpt, "ood", data_dir).path != first


def test_collect_puts_ce_of_both_splits_side_by_side(tiny, tmp_path):
    cfg, data_dir, ckpt = tiny
    store = Store(tmp_path)
    paths = [eval.run(store, cfg, ckpt, split, data_dir) for split in ("id", "ood")]
    attempts, summary = eval.collect(paths)
    assert sorted(attempts["split"].unique()) == ["id", "ood"]
    assert summary.height == 2 and summary["ckpt_id"].to_list() == ["sft-1", "sft-1"]
    ce = dict(zip(summary["split"], summary["ce"]))
    assert summary["ce_id"].to_list() == [ce["id"]] * 2 and summary["ce_ood"].to_list() == [ce["ood"]] * 2
    assert ce["id"] < ce["ood"]  # memorised ID answers


# ---------------------------------------------------------------------------- the reference CE (issue 14 §7, §8)


def _labels_nll(model, tok, prompt: str, answer: str, date_string) -> float:
    """An independent CE_h: the HF model's own loss with the prompt tokens labelled -100
    (one unpadded sequence; the model shifts the labels itself)."""
    seq, n = prompt_completion_ids(tok, [{"role": "user", "content": prompt}], [{"role": "assistant", "content": answer}], date_string)
    ids = torch.tensor([seq])
    labels = ids.clone()
    labels[0, :n] = -100
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


# transformers computes its loss from float32 logits whatever the model's dtype (and so
# does reference_nll), so the two differ by float32 rounding only: at most 6.8e-7 nats
# measured per hand (1.4e-7 batched), float64 and float32 models alike, on CEs from 0.0026
# (memorised) to 4.7. 1e-5 is 15x that, while a label shifted by one token, a prompt
# token or a pad counted moves a memorised hand's CE by far more.
NLL_TOL = 1e-5


def test_reference_ce_equals_the_models_own_labels_loss_per_hand(tiny):
    cfg, data_dir, ckpt = tiny
    table = pl.read_parquet(data_dir / "eval_set_id.parquet")
    tok, model = lm.load_tokenizer(ckpt["path"]), lm.load_model(ckpt["path"], torch.float64)
    hf = [_labels_nll(model, tok, p, a, cfg.chat.date_string) for p, a in zip(table["prompt"], table["answer"])]
    ours = [lm.reference_ce(model, tok, table.slice(i, 1), 1, cfg.chat.date_string) for i in range(table.height)]
    assert ours == pytest.approx(hf, rel=0, abs=NLL_TOL)
    # batched and right-padded (chunks of 3, 3, 2) as the evaluation runs it
    assert lm.reference_ce(model, tok, table, 8, cfg.chat.date_string, batch_size=3) == pytest.approx(sum(hf) / len(hf), rel=0, abs=NLL_TOL)
    assert lm.reference_ce(model, tok, table, 3, cfg.chat.date_string) == pytest.approx(sum(hf[:3]) / 3, rel=0, abs=NLL_TOL)
    assert min(hf[:5]) < 0.1 < 1.0 < max(hf[5:])  # memorised hands and the others: the hands differ


def test_with_answer_first_the_ce_scores_the_sft_target(tiny, tmp_path):
    """data.answer: first trains on each hand's first canonical solution, so the CE (of
    evaluation and of sft_log) scores that answer, and eval_summary says so."""
    cfg, data_dir, ckpt = tiny
    first_cfg = parse_config({**CFG, "data": {**CFG["data"], "answer": "first"}})
    first_dir = Path(data.run(Store(tmp_path / "data"), first_cfg))
    table = pl.read_parquet(first_dir / "eval_set_id.parquet")
    assert table["cards"].to_list() == pl.read_parquet(data_dir / "eval_set_id.parquet")["cards"].to_list()  # the same hands
    tok, model = lm.load_tokenizer(ckpt["path"]), lm.load_model(ckpt["path"], torch.float64)
    hands = [deal("id", first_cfg.data.eval_seed, i) for i in range(table.height)]
    trained = [GP.sft_row(h, first_cfg)["completion"][0]["content"] for h in hands]  # what an SFT row of the hand holds
    hf_first = [_labels_nll(model, tok, p, a, cfg.chat.date_string) for p, a in zip(table["prompt"], trained)]
    hf_dealt = [_labels_nll(model, tok, p, a, cfg.chat.date_string) for p, a in zip(table["prompt"], table["answer"])]
    ours = [lm.reference_ce(model, tok, table.slice(i, 1), 1, cfg.chat.date_string) for i in range(table.height)]
    assert ours == pytest.approx(hf_first, rel=0, abs=NLL_TOL)
    # hands 0-4 had their dealt reference memorised: where the first solution is another
    # formula the two CEs are far apart (measured 0.82 to 2.37 nats on these five hands)
    differ = [i for i in range(5) if hands[i].solutions[0] != hands[i].reference]
    assert len(differ) >= 3
    assert all(abs(ours[i] - hf_dealt[i]) > 0.3 for i in differ)

    _, summary = eval.evaluate_model(lm.load_model(ckpt["path"]), tok, table, first_cfg, ckpt)
    assert summary["ce_target"].to_list() == ["first"]
    assert summary["ce"][0] == pytest.approx(sum(hf_first) / len(hf_first), rel=1e-5)
    # the evaluation set hash covers the cards only: the CE target keeps the cache apart
    store = Store(tmp_path / "store")
    assert eval.artifact(store, first_cfg, ckpt, "id", first_dir).key != eval.artifact(store, cfg, ckpt, "id", data_dir).key
    assert eval.config_hash(first_cfg) != eval.config_hash(cfg)
    with pytest.raises(ValueError, match="data.answer is 'reference'"):
        eval.evaluate_model(model, tok, table, cfg, ckpt)
