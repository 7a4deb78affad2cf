"""PPO throughput: graded attempts per second of the batched rollout versus one hand at a
time (as the authors generated), and seconds per PPO update.

    python benchmarks/bench_rl.py [--envs 32] [--rounds 4] [--updates 3]
    python benchmarks/bench_rl.py --config configs/toy-long.yaml   # a study's PPO settings
                                      # (its envs, rounds and decoding; --envs/--rounds/--max-new-tokens unused)
    python benchmarks/bench_rl.py --qwen      # GPU: Qwen2.5-0.5B-shaped random model, bf16

Both rollouts run the same number of generations with the same checkpoint and decoding:
`--envs` environments advanced together for `--rounds` rounds (one generate call per
round), against one environment advanced for envs x rounds rounds. The tiny checkpoint is
the embedded model after a short SFT, so responses have realistic lengths; the Qwen-shaped
model is random, so its responses run to max_new_tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

from rlheal.config import load_config, parse_config
from rlheal.store import Store
from tasks import data, lm, rl, sft
from tasks.model import build_tokenizer
import tasks.model
from tasks.rl import common
from tasks.rl.ppo import precision
from tasks.rl.rollout import Envs, Generator, rollout
from tasks.benchmark import get

GP = get("generalpoints")


def study(envs: int, rounds: int, updates: int, max_new_tokens: int, rl_from: str | None = None):
    """The bench study; with `rl_from`, that config's RL section (its PPO and decoding
    settings) replaces the defaults, run for `updates` updates."""
    if rl_from is not None:
        rl_section = load_config(rl_from).rl.model_dump(mode="json")
        if rl_section["algorithm"] != "ppo":
            raise SystemExit(f"{rl_from}: rl.algorithm is {rl_section['algorithm']!r}; this benchmark measures PPO")
        rl_section.update(save_steps=[0, updates], from_steps="all")
        raw = study(envs, rounds, updates, max_new_tokens).model_dump(mode="json")
        return parse_config({**raw, "rl": rl_section})
    return parse_config(
        {
            "name": "bench",
            "data": {"train_size": 40 * 32, "eval_size": 8},
            "sft": {"save_steps": [0, 40], "batch_size": 32, "per_device_batch_size": 32, "learning_rate": 1e-2, "lr_schedule": "constant", "ce_every": 10_000},
            "eval": {"ce_hands": 0},
            "rl": {
                "save_steps": [0, updates],
                "decoding": {"temperature": 1.0, "max_new_tokens": max_new_tokens},
                "ppo": {"num_envs": envs, "steps_per_env": rounds, "micro_batch_size": 8, "learning_rate": 1e-4, "max_grad_norm": 1.0},
            },
        }
    )


def attempts_per_second(model, tok, cfg, n_envs: int, rounds: int, cuda: bool) -> tuple[float, float]:
    """(graded attempts, generated tokens) per second of `rounds` rounds over `n_envs` environments."""
    envs = Envs(GP, n_envs, lambda i: common.example_stream(cfg, set(), i), cfg.rl.seed, cfg.verifier.mode, cfg.verifier.verify_iter)
    generate = Generator(model, tok, cfg.rl.decoding.resolved(), cfg.chat.date_string, precision(cuda))
    torch.manual_seed(0)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    steps, _ = rollout(envs, generate, rounds)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return sum(not s.truncated for s in steps) / seconds, sum(len(s.response) for s in steps) / seconds


def compare(model, tok, cfg, label: str, cuda: bool) -> None:
    p = cfg.rl.ppo
    attempts_per_second(model, tok, cfg, p.num_envs, 1, cuda)  # warm-up
    batched, tokens_b = attempts_per_second(model, tok, cfg, p.num_envs, p.steps_per_env, cuda)
    single, tokens_s = attempts_per_second(model, tok, cfg, 1, p.num_envs * p.steps_per_env, cuda)
    n = p.num_envs * p.steps_per_env
    print(f"{label}: {n} generations per rollout, max_new_tokens {cfg.rl.decoding.resolved()['max_new_tokens']}")
    print(f"  batched rollout ({p.num_envs} envs x {p.steps_per_env} rounds): {batched:8.2f} graded attempts/s, {tokens_b:9,.0f} tokens/s")
    print(f"  one hand at a time ({n} rounds)         : {single:8.2f} graded attempts/s, {tokens_s:9,.0f} tokens/s")
    print(f"  ratio: x{batched / single:.1f}")


def seconds_per_update(store: Store, cfg, start: dict, data_dir: Path) -> list[float]:
    run_dir = Path(rl.run(store, cfg, start, data_dir))
    walls = pl.read_parquet(run_dir / "rl_log.parquet")["wall_seconds"].to_list()
    return [b - a for a, b in zip([0.0, *walls], walls)]


def run_tiny(args) -> None:
    cfg = study(args.envs, args.rounds, args.updates, args.max_new_tokens, args.config)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        data_dir = data.run(store, cfg)
        run_dir = sft.run(store, cfg, tasks.model.run(store, cfg), data_dir)
        start = pl.read_parquet(Path(run_dir) / "checkpoints.parquet").to_dicts()[-1]
        tok, model = lm.load_tokenizer(start["path"]), lm.load_model(start["path"]).eval()
        n_params = sum(q.numel() for q in model.parameters())
        compare(model, tok, cfg, f"tiny model after 40 SFT steps ({n_params:,} parameters), torch threads {torch.get_num_threads()}", False)
        per_update = seconds_per_update(store, cfg, start, Path(data_dir))
    n = cfg.rl.ppo.num_envs * cfg.rl.ppo.steps_per_env
    mean = sum(per_update) / len(per_update)
    print(f"  PPO update ({n} samples, {cfg.rl.ppo.epochs} epochs, minibatch {cfg.rl.ppo.minibatch_size or n}): " + ", ".join(f"{s:.2f}" for s in per_update) + " s per update")
    print(f"  {1 / mean:.3f} updates/s, {n / mean:.1f} generations/s (rollout, scoring and update together)")


def run_qwen(args) -> None:
    """GPU only: a Qwen2.5-0.5B-shaped random model with the tiny tokenizer's vocabulary."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    assert torch.cuda.is_available(), "--qwen needs a CUDA GPU"
    cfg = study(args.envs, args.rounds, args.updates, args.max_new_tokens)
    tok = build_tokenizer(GP)
    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=4096, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qwen"
        model = Qwen2ForCausalLM(config)
        model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        bf16 = lm.load_model(path, torch.bfloat16, "cuda").eval()
        n_params = sum(q.numel() for q in bf16.parameters())
        compare(bf16, tok, cfg, f"Qwen2.5-0.5B-shaped random model ({n_params / 1e6:.0f}M parameters), bf16, {torch.cuda.get_device_name()}", True)
        del bf16
        torch.cuda.empty_cache()
        store = Store(Path(tmp) / "store")
        data_dir = data.run(store, cfg)
        start = {"ckpt_id": "qwen-random", "stage": "base", "step": 0, "path": str(path), "content_hash": lm.weights_hash(path)}
        torch.cuda.reset_peak_memory_stats()
        per_update = seconds_per_update(store, cfg, start, Path(data_dir))
    print(f"  PPO update ({cfg.rl.ppo.num_envs * cfg.rl.ppo.steps_per_env} samples, {cfg.rl.ppo.epochs} epochs, fp32 weights + bf16 autocast): " + ", ".join(f"{s:.2f}" for s in per_update) + " s per update")
    print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--envs", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--updates", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--config", default=None, help="take the RL settings (PPO, decoding) from this study config")
    ap.add_argument("--qwen", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run_qwen(args) if args.qwen else run_tiny(args)


if __name__ == "__main__":
    main()
