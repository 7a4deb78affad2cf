"""The drift stage's cost (issue 19): per checkpoint against the eval stage's, and the
hidden-state read batched against one prompt at a time.

    python benchmarks/bench_drift.py --store <a finished toy study's store> [--config configs/toy.yaml] [--prompts 500]

Both figures are measured in this run, on the study's own checkpoints and prompts:
- drift per checkpoint: `tasks.drift.measure` of the last SFT checkpoint against the base
  and its previous checkpoint on both splits, read as the stage reads them (`drift.Reader`,
  loading included), plus its share of the base's greedy answers (built once per study),
  against `tasks.eval` of the same checkpoint on both splits (loading included), timed here
  in the same process. Twice: cold (nothing kept: three models read) and as in a study,
  where the task before it (its previous checkpoint's, timed too) kept the base's and the
  previous checkpoint's reads;
- the floor: one teacher-forced forward of the checkpoint alone over both splits' sequences
  (what any drift measure that reads the model must spend), against the same eval;
- hidden-state extraction: `tasks.drift.states.forward` over the OOD prompts in batches of
  --batch-size, against a batch of one per prompt (the authors' loop); the two must agree.
The tiny model's vocabulary is small: on a large one the per-position distributions
(the sequence KL) cost more, relative to generation, than here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl  # noqa: E402
import torch  # noqa: E402

from tasks import drift  # noqa: E402
from tasks.drift import states  # noqa: E402
from tasks.lm import load_model, load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, required=True, help="the store of a finished study (make demo: store/)")
    ap.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs/toy.yaml", help="the study's config (its name names the study)")
    ap.add_argument("--prompts", type=int, default=None, help="drift.prompts: the drift stage's prompts per split (default: all of the evaluation set; evaluation always reads all of it)")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from rlheal.config import load_config

    sets = [f"drift.batch_size={args.batch_size}", "drift.enabled=true"] + ([f"drift.prompts={args.prompts}"] if args.prompts else [])
    cfg = load_config(args.config, str(args.store), sets)
    tables = args.store / "studies" / cfg.name / "tables"
    if not (tables / "checkpoints.parquet").is_file():
        ap.error(f"--store: {tables} holds no finished study's tables")
    ckpts = pl.read_parquet(tables / "checkpoints.parquet").filter(pl.col("stage").is_in(["base", "sft"])).sort("step").to_dicts()
    base, prev, last = ckpts[0], ckpts[-2], ckpts[-1]
    data_dir = (tables / "eval_set_ood.parquet").resolve().parent  # the published table links into its data artifact
    tok = load_tokenizer(base["path"])

    t0 = time.perf_counter()
    answers = drift.answer_rows(load_model(base["path"]).eval(), tok, cfg, data_dir)
    t_answers = time.perf_counter() - t0

    by_id = {c["ckpt_id"]: c for c in ckpts}

    def timed(ckpt: dict, previous: dict) -> float:
        t0 = time.perf_counter()
        drift.measure(drift.Reader(cfg, by_id, tok.pad_token_id), answers, ckpt, {"base": base, "previous": previous})
        return time.perf_counter() - t0

    drift.READS.clear()
    t_cold = timed(last, prev)
    drift.READS.clear()
    t_before = timed(prev, drift.previous(prev, ckpts))  # the task before keeps the base's and its own reads
    t_drift = timed(last, prev)

    from tasks.eval import evaluate_model

    t0 = time.perf_counter()
    model = load_model(last["path"]).eval()
    for split in drift.SPLITS:
        evaluate_model(model, tok, pl.read_parquet(data_dir / f"eval_set_{split}.parquet"), cfg, last)
    t_eval = time.perf_counter() - t0
    n_ckpt = pl.read_parquet(tables / "checkpoints.parquet").height - 1
    share = t_answers / n_ckpt
    n = answers.height // 2
    print(f"{cfg.name}: {n} prompts per split, batch {args.batch_size}, one torch thread")
    print(f"  drift of one checkpoint, cold (3 models read, 2 splits x 2 references): {t_cold:.2f} s + {share:.2f} s (its share of the base's answers, {t_answers:.2f} s for {n_ckpt} checkpoints)")
    print(f"  drift of one checkpoint in a study (the task before, {t_before:.2f} s, kept the base and its previous): {t_drift:.2f} s + {share:.2f} s")
    print(f"  eval of the same checkpoint (both splits, loading included):        {t_eval:.2f} s")
    print(f"  drift / eval per checkpoint: {(t_drift + share) / t_eval:.3f} in a study, {(t_cold + share) / t_eval:.3f} cold")
    t0 = time.perf_counter()
    for split in drift.SPLITS:
        for _ in states.forward(model, *states.sequences(answers, split), tok.pad_token_id, args.batch_size):
            pass
    t_floor = time.perf_counter() - t0
    print(f"  the floor, one forward of the checkpoint alone over both splits: {t_floor:.2f} s = {t_floor / t_eval:.3f} of eval")

    seqs, lens = states.sequences(answers, "ood")
    t0 = time.perf_counter()
    batched = torch.cat([b.hidden for b in states.forward(model, seqs, lens, tok.pad_token_id, args.batch_size)])
    t_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = torch.cat([b.hidden for s, k in zip(seqs, lens) for b in states.forward(model, [s], [k], tok.pad_token_id, 1)])
    t_single = time.perf_counter() - t0
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    print(f"  hidden states of {n} OOD prompts: batched {n / t_batched:.1f} prompts/s, one at a time {n / t_single:.1f} prompts/s: x{t_single / t_batched:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
