"""SFT throughput: trained tokens per second of the `sft` stage.

    python benchmarks/bench_sft.py [--steps 40] [--batch 32]
    python benchmarks/bench_sft.py --qwen      # GPU: Qwen2.5-0.5B-shaped random model, bf16, with MFU

Tokens = every non-padding token of the rows the run consumed (prompt and completion;
the forward and backward passes process both). The baseline in the same run is the
same training with TRL tokenising the conversational rows itself (its default path)
instead of rlheal's pre-tokenised rows.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

from rlheal.config import parse_config
from rlheal.store import Store
from tasks import data, lm, model, sft
from tasks.chat import prompt_completion_ids


def study(steps: int, batch: int):
    return parse_config(
        {
            "name": "bench",
            "data": {"train_size": steps * batch, "eval_size": 8},
            "sft": {"save_steps": [0, steps], "batch_size": batch, "per_device_batch_size": batch, "learning_rate": 1e-3, "lr_schedule": "constant", "ce_every": 10_000},
            "eval": {"ce_hands": 0},
        }
    )


def trained_tokens(cfg, model_dir: Path, data_dir: Path) -> int:
    tok = lm.load_tokenizer(model_dir)
    rows = pl.read_parquet(data_dir / "sft_train.parquet").head(cfg.sft.max_steps * cfg.sft.batch_size)
    return sum(len(prompt_completion_ids(tok, p, c, cfg.chat.date_string)[0]) for p, c in zip(rows["prompt"].to_list(), rows["completion"].to_list()))


def run_tiny(steps: int, batch: int) -> None:
    cfg = study(steps, batch)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        data_dir, model_dir = data.run(store, cfg), model.run(store, cfg)
        tokens = trained_tokens(cfg, model_dir, data_dir)
        run_art = sft.artifact(store, cfg, Store.from_path(model_dir), Store.from_path(data_dir))
        t0 = time.perf_counter()
        sft.train(store, run_art, cfg, model_dir, data_dir)
        ours = time.perf_counter() - t0
        baseline = trl_default_path(cfg, model_dir, data_dir, Path(tmp) / "baseline")
        n_params = sum(p.numel() for p in lm.load_model(model_dir).parameters())
    print(f"tiny model ({n_params:,} parameters), {steps} steps x batch {batch}, {tokens:,} tokens, torch threads {torch.get_num_threads()}")
    print(f"  rlheal (pre-tokenised rows): {tokens / ours:10,.0f} tokens/s  {steps / ours:6.2f} steps/s  ({ours:.2f} s)")
    print(f"  baseline (TRL tokenises)   : {tokens / baseline:10,.0f} tokens/s  {steps / baseline:6.2f} steps/s  ({baseline:.2f} s)")
    print(f"  ratio: x{baseline / ours:.2f}")


def trl_default_path(cfg, model_dir: Path, data_dir: Path, out: Path) -> float:
    """Same optimizer, schedule and rows; TRL renders and tokenises the conversations."""
    from datasets import Dataset
    from trl import SFTTrainer

    tok = lm.load_tokenizer(model_dir)
    rows = pl.read_parquet(data_dir / "sft_train.parquet").head(cfg.sft.max_steps * cfg.sft.batch_size)
    model = lm.load_model(model_dir)
    opt = sft.make_optimizer(model, cfg.sft)
    t0 = time.perf_counter()
    ds = Dataset.from_dict({"prompt": rows["prompt"].to_list(), "completion": rows["completion"].to_list()})
    SFTTrainer(model=model, args=sft.trainer_args(cfg, out, False), train_dataset=ds, processing_class=tok, optimizers=opt).train()
    return time.perf_counter() - t0


def run_qwen(steps: int, batch: int) -> None:
    """GPU only: a Qwen2.5-0.5B-shaped random model in bf16; tokens/s and model FLOPs utilisation."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    assert torch.cuda.is_available(), "--qwen needs a CUDA GPU"
    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=2048)
    model = Qwen2ForCausalLM(config).to("cuda", torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    seq = 256
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-7)
    for _ in range(3):  # warm-up
        model(input_ids=ids, labels=ids).loss.backward(), opt.step(), opt.zero_grad()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = steps * batch * seq / dt
    peak = 989e12  # H100 SXM dense bf16
    print(f"Qwen2.5-0.5B-shaped ({n_params / 1e6:.0f}M parameters), batch {batch} x {seq} tokens, bf16, {torch.cuda.get_device_name()}")
    print(f"  {tps:,.0f} tokens/s; MFU {6 * n_params * tps / peak:.1%} (6·N·tokens/s over {peak / 1e12:.0f} TFLOP/s)")
    print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--qwen", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run_qwen(args.steps, args.batch) if args.qwen else run_tiny(args.steps, args.batch)


if __name__ == "__main__":
    main()
