"""Evaluation throughput: rlheal's batched evaluator against the authors' one-at-a-time loop.

    python benchmarks/bench_eval.py [--hands 128] [--max-new-tokens 64] [--batch-size 64]
    python benchmarks/bench_eval.py --qwen            # on a GPU machine

Both methods play the same multi-attempt episodes (GP §8) on the same evaluation hands
with the same greedy decoding, the same renderer and the same stop tokens:
- `batched`: `tasks.eval.evaluate_model` (all unfinished episodes of the split per
  round, chunks of --batch-size sorted by length, left padding, KV cache);
- `baseline`: the authors' way (training.md §7.1), written out here: for each hand, for
  each attempt, one `model.generate` call on a batch of one (KV cache, no padding).
Each method runs in its own process, so its peak resident memory (ru_maxrss) is its own;
on CUDA the peak allocated GPU memory is reported too. Greedy outputs of the two methods
must be identical; the script checks it.

Model: the embedded tiny model with random weights (a random model rarely stops early, so
nearly every attempt generates --max-new-tokens tokens in both methods). `--qwen`: a
randomly initialised Qwen2.5-0.5B-shaped model (bf16 on CUDA), driven by the tiny
word-level tokenizer with the vocabulary padded to Qwen's 151,936 ids; generated ids
outside the tokenizer decode to nothing, so conversations grow less than a real model's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402
import torch  # noqa: E402

from rlheal.config import ModelSection, StudyConfig, parse_config  # noqa: E402
from tasks import data, eval, lm
from tasks.model import build_tiny
from tasks.chat import encode, render  # noqa: E402
from tasks.generalpoints import Episode  # noqa: E402
from tasks.benchmark import eval_examples, eval_set_hash, examples_of, get  # noqa: E402

GP = get("generalpoints")

QWEN = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)


def study_config(args) -> StudyConfig:
    return parse_config(
        {
            "name": "bench",
            "eval": {"batch_size": args.batch_size, "ce_hands": 0, "decoding": {"preset": "greedy", "max_new_tokens": args.max_new_tokens}},
        }
    )


def hands_table(n: int) -> pl.DataFrame:
    hands = eval_examples(GP, 42, n)
    return data.eval_table(GP, hands["id"], eval_set_hash(GP, hands), parse_config({"name": "bench"}))


def load(args, device: torch.device):
    tok = lm.load_tokenizer(args.model_dir)
    if not args.qwen:
        return lm.load_model(args.model_dir, torch.float32, device), tok
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Qwen2Config(**QWEN, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None, dtype=dtype)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model.eval(), tok


# ---------------------------------------------------------------------------- the two methods


def batched(model, tok, table, cfg) -> pl.DataFrame:
    attempts, _ = eval.evaluate_model(model, tok, table, cfg, {"ckpt_id": "bench", "stage": "base", "step": 0})
    return attempts


@torch.no_grad()
def baseline(model, tok, table, cfg) -> pl.DataFrame:
    """The authors' loop: one hand, one attempt, one generate call at a time."""
    config = lm.generation_config(cfg.eval.decoding.resolved(), tok)
    stops = set(config.eos_token_id)
    device = next(model.parameters()).device
    played = eval.Played([], [], 1)
    for hand in examples_of(GP, table):
        episode, gens = Episode(hand, cfg.verifier.mode, cfg.verifier.verify_iter), []
        while not episode.done:
            ids = encode(tok, render(tok, episode.messages(), add_generation_prompt=True, date_string=cfg.chat.date_string))
            with lm.only(model, config):
                out = model.generate(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device), generation_config=config)
            new = out[0, len(ids) :].tolist()
            end = next((t for t, tid in enumerate(new) if tid in stops), None)
            text = tok.decode(new if end is None else new[:end], skip_special_tokens=True)
            gens.append(lm.Generation(text, len(new) if end is None else end + 1, end is None))
            episode.record(text)
        played.episodes.append(episode)
        played.generations.append(gens)
    return eval.attempts_table(GP, played, "bench", table["split"][0], "reference")


def child(args) -> None:
    """Run one method in this process; print one JSON line of measurements."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model, tok = load(args, device)
    cfg = study_config(args)
    table = hands_table(args.hands)
    method = batched if args.child == "batched" else baseline
    method(model, tok, table.head(2), cfg)  # warm-up: first-call allocations, kernels
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gpu_before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    attempts = method(model, tok, table, cfg)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    attempts.write_parquet(args.out)
    print(
        json.dumps(
            {
                "method": args.child,
                "hands": args.hands,
                "seconds": seconds,
                "attempts": attempts.height,
                "generated_tokens": int(attempts["generated_tokens"].sum()),
                "peak_rss_mib": rss_after / 1024,
                "rss_growth_mib": (rss_after - rss_before) / 1024,
                "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                "gpu_growth_mib": (torch.cuda.max_memory_allocated() - gpu_before) / 2**20 if cuda else None,
                "device": torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} torch thread(s)",
                "n_params": sum(p.numel() for p in model.parameters()),
            }
        )
    )


def spawn(method: str, args, hands: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--model-dir", str(args.model_dir), "--hands", str(hands), "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size), "--out", str(out)]
    if args.qwen:
        cmd.append("--qwen")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{method} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hands", type=int, default=128, help="evaluation hands (ID split)")
    p.add_argument("--baseline-hands", type=int, default=None, help="hands for the slow baseline (default: all; --qwen: 16); rates are per hand")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--qwen", action="store_true", help="Qwen2.5-0.5B-shaped random model (use a GPU)")
    p.add_argument("--child", choices=["batched", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        tmp = Path(tmp)
        args.model_dir = tmp / "tiny"
        args.model_dir.mkdir()
        build_tiny(args.model_dir, parse_config({"name": "bench"}))  # weights unused under --qwen
        base_hands = args.baseline_hands or (min(16, args.hands) if args.qwen else args.hands)
        fast = spawn("batched", args, args.hands, tmp / "batched.parquet")
        slow = spawn("baseline", args, base_hands, tmp / "baseline.parquet")
        a, b = pl.read_parquet(tmp / "batched.parquet"), pl.read_parquet(tmp / "baseline.parquet")
        same = a.filter(pl.col("hand_index") < base_hands).equals(b)

    model = "Qwen2.5-0.5B-shaped random model, tiny word-level tokenizer" if args.qwen else "tiny random model"
    print(f"model: {model} ({fast['n_params']:,} parameters); device: {fast['device']}")
    print(f"greedy, max_new_tokens {args.max_new_tokens}, verify_iter 5, batch size {args.batch_size}")
    rows = []
    for r in (fast, slow):
        r["hands_per_s"] = r["hands"] / r["seconds"]
        r["tokens_per_s"] = r["generated_tokens"] / r["seconds"]
        gpu = f", peak GPU {r['peak_gpu_mib']:.0f} MiB (+{r['gpu_growth_mib']:.0f})" if r["peak_gpu_mib"] is not None else ""
        rows.append(
            f"{r['method']:>8}: {r['hands']} hands, {r['attempts']} attempts, {r['generated_tokens']} tokens in {r['seconds']:.1f} s"
            f" -> {r['hands_per_s']:.2f} hands/s, {r['tokens_per_s']:.0f} tokens/s; peak RSS {r['peak_rss_mib']:.0f} MiB (+{r['rss_growth_mib']:.0f} during the run){gpu}"
        )
    print("\n".join(rows))
    print(f"speed-up (hands/s): {fast['hands_per_s'] / slow['hands_per_s']:.1f}x; (tokens/s): {fast['tokens_per_s'] / slow['tokens_per_s']:.1f}x")
    print(f"identical attempts on the {base_hands} common hands: {same}")


if __name__ == "__main__":
    main()
