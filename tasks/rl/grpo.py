"""`rl.algorithm: grpo` — TRL's GRPOTrainer on single attempts (training.md §4).

Prompts are the training hands of the shared stream, in order (no shuffling), as one
user message each; the reward is the verifier's score of the completion (`table`) or
1/0 (`binary`). Every TRL setting that matters is passed explicitly from `cfg.rl.grpo`;
the checkpoint's generation config is replaced by a bare one so nothing leaks in.
Checkpoints at rl.save_steps (GRPO steps) come from the same callback as SFT's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import GenerationConfig, TrainerCallback

from rlheal.config import StudyConfig
from rlheal.store import Artifact, Store
from tasks import lm
from tasks.chat import encode, render, stop_token_ids
from tasks import benchmark
from tasks.benchmark import Benchmark
from tasks.rl import common
from tasks.sft import StepCheckpoints, last_complete

log = logging.getLogger("rlheal.rl")


# ---------------------------------------------------------------------------- prompts


def template_kwargs(cfg: StudyConfig) -> dict:
    return {"date_string": cfg.chat.date_string} if cfg.chat.date_string is not None else {}


def trl_prompt_ids(tok, messages: list[dict], kwargs: dict) -> list[int]:
    """What GRPOTrainer tokenises for a conversational prompt (its `_tokenize_prompts`)."""
    out = tok.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"][0])


def prompt_column(tok, cfg: StudyConfig, messages: list[dict]):
    """The dataset's `prompt` for one hand: the conversation itself when TRL's rendering
    gives the project's token ids (training.md §0); otherwise the pre-rendered text, with
    the template's BOS text removed when the tokenizer adds a BOS itself."""
    ours = encode(tok, render(tok, messages, True, cfg.chat.date_string))
    if trl_prompt_ids(tok, messages, template_kwargs(cfg)) == ours:
        return messages
    text = render(tok, messages, True, cfg.chat.date_string)
    if tok.bos_token and text.startswith(tok.bos_token) and tok("")["input_ids"][:1] == [tok.bos_token_id]:
        text = text[len(tok.bos_token) :]
    if tok(text)["input_ids"] != ours:
        raise ValueError("rl.algorithm grpo: neither TRL's chat rendering nor pre-rendered text gives the project's prompt token ids")
    return text


def dataset(tok, cfg: StudyConfig, reward: Reward, exclude: set, n: int) -> Dataset:
    """The first `n` examples of the RL stream as prompts (each episode's first user
    turn: GRPO is single-turn); `reward` learns which example each index is."""
    rows = {"prompt": [], "index": []}
    for example in common.example_stream(cfg, exclude):
        first = reward.bench.episode(example, reward.mode, cfg.verifier.verify_iter).messages()
        rows["prompt"].append(prompt_column(tok, cfg, first))
        rows["index"].append(example.index)
        reward.examples[example.index] = example
        if len(rows["index"]) == n:
            break
    return Dataset.from_dict(rows)


def prompts_needed(cfg: StudyConfig) -> int:
    """Distinct prompts TRL consumes in rl.num_updates steps (one generation batch per
    num_iterations steps), plus one generation batch of slack."""
    g = cfg.rl.grpo
    per_generation = g.per_device_batch_size * g.gradient_accumulation_steps * int(os.environ.get("WORLD_SIZE", "1")) // g.num_generations
    return (math.ceil(cfg.rl.num_updates / g.num_iterations) + 1) * per_generation


# ---------------------------------------------------------------------------- reward and log


def group_advantages(rewards: np.ndarray, group: int, scale: str) -> np.ndarray:
    """TRL's advantages: reward minus its group mean, divided by the group's (or the
    batch's) std + 1e-4 unless scale_rewards is none."""
    r = rewards.reshape(-1, group)
    adv = r - r.mean(1, keepdims=True)
    if scale in ("group", "true", "True"):
        adv = adv / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    elif scale == "batch":
        adv = adv / (rewards.std(ddof=1) + 1e-4)
    return adv.reshape(-1)


class Reward:
    """The reward function (TRL calls it with the dataset's `index` column); also keeps the
    scores of every batch for the log callback."""

    def __init__(self, bench: Benchmark, mode: str, kind: str):
        self.bench, self.mode, self.kind, self.pending = bench, mode, kind, []
        self.examples: dict[int, object] = {}  # dataset index -> example (`dataset`)
        self.__name__ = bench.name  # TRL names the reward's log keys after it

    def __call__(self, prompts, completions, index, completion_ids=None, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = [self.bench.score(t, self.examples[i], self.mode) for t, i in zip(texts, index)]
        correct = [self.bench.solves(s) for s in scores]
        rewards = [s.reward if self.kind == "table" else float(c) for s, c in zip(scores, correct)]
        self.pending.append({"rewards": rewards, "correct": correct, "outcomes": [s.outcome for s in scores]})
        return rewards

    def take(self) -> list[dict]:
        out, self.pending = self.pending, []
        return out


class GrpoLog(TrainerCallback):
    """One rl_log row per GRPO step, kept in the trainer's log history (so it survives a resume)."""

    def __init__(self, reward: Reward, cfg: StudyConfig, start: dict, started: float):
        self.reward, self.cfg, self.start, self.started = reward, cfg, start, started

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        g, rl = self.cfg.rl.grpo, self.cfg.rl
        batches = self.reward.take()
        row = {
            "rl_start_step": self.start["step"],
            "parent": self.start["ckpt_id"],
            "algorithm": "grpo",
            "update": state.global_step,
            "loss": logs.get("loss"),
            "clip_fraction": logs.get("clip_ratio/region_mean"),
            "kl": logs.get("kl"),
            "grad_norm": logs.get("grad_norm"),
            "learning_rate": logs.get("learning_rate"),
            "mean_response_tokens": logs.get("completions/mean_length"),
            "wall_seconds": time.time() - self.started,
        }
        if batches:  # none when num_iterations > 1 reuses an earlier generation
            rewards = np.concatenate([b["rewards"] for b in batches]).astype(np.float64)
            outcomes = [o for b in batches for o in b["outcomes"]]
            adv = np.concatenate([group_advantages(np.asarray(b["rewards"], dtype=np.float64), g.num_generations, g.scale_rewards) for b in batches])
            row.update(
                reward_mean=float(rewards.mean()),
                reward_std=float(rewards.std(ddof=1)) if rewards.size > 1 else None,
                success_rate=float(np.mean([c for b in batches for c in b["correct"]])),
                **{f"count_{o}": outcomes.count(o) for o in self.reward.bench.outcomes},
                truncations=0,
                **common.advantage_distribution(adv, rl.adv_hist_bins, rl.adv_hist_range),
            )
        state.log_history[-1]["rl_log"] = row
        log.info("rl grpo from %s step %d/%d: reward %s, loss %.4f", self.start["ckpt_id"], state.global_step, rl.num_updates, row.get("reward_mean"), row["loss"])


# ---------------------------------------------------------------------------- one run


def trainer_args(cfg: StudyConfig, out: Path, cuda: bool):
    from trl import GRPOConfig

    g = cfg.rl.grpo
    decoding = g.decoding.resolved()  # samples (GrpoDecodingSection)
    return GRPOConfig(
        output_dir=str(out),
        max_steps=cfg.rl.num_updates,
        per_device_train_batch_size=g.per_device_batch_size,
        gradient_accumulation_steps=g.gradient_accumulation_steps,
        num_generations=g.num_generations,
        max_completion_length=decoding["max_new_tokens"],
        temperature=decoding["temperature"],
        top_p=decoding["top_p"],
        top_k=decoding["top_k"],
        repetition_penalty=decoding["repetition_penalty"],
        learning_rate=g.learning_rate,
        beta=g.beta,
        loss_type=g.loss_type,
        epsilon=g.epsilon,
        scale_rewards=g.scale_rewards,
        num_iterations=g.num_iterations,
        shuffle_dataset=False,  # hands in stream order, the same for every run
        chat_template_kwargs=template_kwargs(cfg),
        logging_steps=1,
        save_strategy="no",  # saves come from StepCheckpoints at the listed steps
        report_to="none",
        bf16=cuda,
        use_cpu=not cuda,
        seed=decoding["seed"],
        dataloader_num_workers=0,
    )


def _elapsed(resume: Path | None) -> float:
    if resume is None:
        return 0.0
    history = json.loads((resume / "trainer_state.json").read_text())["log_history"]
    walls = [e["rl_log"]["wall_seconds"] for e in history if "rl_log" in e]
    return walls[-1] if walls else 0.0


def train(store: Store, run: Artifact, cfg: StudyConfig, start: dict, exclude: set) -> list[dict]:
    """Run GRPO from `start` to rl.num_updates steps, resuming from the last complete
    trainer checkpoint; returns the rl_log rows."""
    from trl import GRPOTrainer

    g = cfg.rl.grpo
    out = run.work_dir
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    tok = lm.load_tokenizer(start["path"], cfg.model.trust_remote_code)
    # fp32 master weights; bf16 autocast on GPU through TRL's bf16 flag
    model = lm.load_model(start["path"], torch.float32, "cuda" if cuda else "cpu", cfg.model.trust_remote_code)
    model.generation_config = GenerationConfig(eos_token_id=stop_token_ids(tok), pad_token_id=tok.pad_token_id)
    reward = Reward(benchmark.of(cfg), cfg.verifier.mode, g.reward)
    resume = last_complete(out)
    started = time.time() - _elapsed(resume)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=trainer_args(cfg, out, cuda),
        train_dataset=dataset(tok, cfg, reward, exclude, prompts_needed(cfg)),
        processing_class=tok,
        peft_config=lm.lora_config(g.lora, model, "rl.grpo.lora") if g.lora.enabled else None,
        callbacks=[StepCheckpoints(store, run, [s for s in cfg.rl.save_steps if s > 0], started), GrpoLog(reward, cfg, start, started)],
    )
    if resume:
        log.info("rl resumes from %s", resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    final = last_complete(out)
    history = json.loads((final / "trainer_state.json").read_text())["log_history"]
    return [e["rl_log"] for e in history if "rl_log" in e]
