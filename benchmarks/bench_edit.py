"""Rotation-editing sweep cost: rlheal's cached SVDs and in-memory edits against the authors' way.

    python benchmarks/bench_edit.py [--hidden 256] [--layers 4] [--hands 3] [--max-new-tokens 16]

A tiny Llama (GQA) with a donor (B) and a target (S) that differ in every weight, and the
`small` grid: six variants (E2 top 0.2, E2 top 1.0, E1 top 0.2, E4 top 1.0, E3 first quarter
E2 at 1.0, E0). Both sides evaluate every edited model on the same few hands per split.
- rlheal: B and S decomposed once into the SVD cache (fp64, the CPU default: its SVDs cost
  about 3x the baseline's fp32 ones; again in fp32, the GPU dtype, edit time only, to isolate
  the gain from caching); the target loaded once; per variant the edited
  tensors are backed up, W' written in place as low-rank corrections, evaluated, restored
  and the whole model checksummed.
- baseline (the authors' way): per variant, both models read, both full SVDs of every
  selected matrix recomputed in fp32, W' reconstructed, a full checkpoint written, and that
  checkpoint loaded back for evaluation.
Edit time (everything but generation) and evaluation time are printed separately.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import load_file, save_file

from rlheal.config import parse_config
from rlheal.store import Store
from tasks import data, edit, eval, lm, model, svd
from tasks.edit.apply import base_matrices, in_scope
from tasks.svd.roles import ROLES_SCHEMA

SPLITS = ("id", "ood")


def setup(root: Path, hidden: int, layers: int, hands: int, max_new_tokens: int):
    tiny = {"hidden_size": hidden, "intermediate_size": hidden * 8 // 3, "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2}
    cfg = parse_config({
        "name": "bench", "model": {"builtin": "tiny", "tiny": tiny}, "data": {"train_size": 64, "eval_size": hands},
        "sft": {"save_steps": [0, 1], "batch_size": 8, "per_device_batch_size": 8},
        "eval": {"ce_hands": hands, "decoding": {"max_new_tokens": max_new_tokens}}, "edit": {"grid": "small"},
    })  # fmt: skip
    base = root / "base"
    model.build_tiny(base, cfg)
    w0 = load_file(base / "model.safetensors")
    rows = []
    for ckpt, seed in (("sft-4", 4), ("sft-8", 8)):
        g = torch.Generator().manual_seed(seed)
        out = root / ckpt
        shutil.copytree(base, out)
        save_file({k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) for k, v in w0.items()}, out / "model.safetensors", metadata={"format": "pt"})
        rows.append({"ckpt_id": ckpt, "stage": "sft", "step": int(ckpt[4:]), "parent": "base", "path": str(out), "content_hash": lm.weights_hash(out)})
    ckpts = pl.DataFrame(rows, schema_overrides={"step": pl.Int32})
    roles = pl.DataFrame([{"role": "B", "ckpt_id": "sft-4"}, {"role": "S", "ckpt_id": "sft-8"}], schema={"role": ROLES_SCHEMA["role"], "ckpt_id": ROLES_SCHEMA["ckpt_id"]})
    data_dir = Path(data.run(Store(root / "data"), cfg))
    hands_tables = {s: pl.read_parquet(data_dir / f"eval_set_{s}.parquet") for s in SPLITS}
    variants = [v for v in edit.variants(cfg, roles, layers) if v["method"] != "none"]
    return cfg, {r["ckpt_id"]: r for r in ckpts.to_dicts()}, variants, hands_tables


def evaluate_both(model, tok, hands: dict, cfg) -> float:
    t0 = time.perf_counter()
    for s in SPLITS:
        eval.evaluate_model(model, tok, hands[s], cfg, {"ckpt_id": "edit"})
    return time.perf_counter() - t0


def rlheal(root: Path, cfg, rows: dict, variants: list[dict], hands: dict, dtype=torch.float64, evaluation: bool = True) -> tuple[float, float, float]:
    """(one-time SVD pass, edits, evaluation) seconds; SVDs and W' in `dtype`."""
    store = Store(root / "store")
    target, donor = rows["sft-8"], rows["sft-4"]
    t0 = time.perf_counter()
    cache = svd.SvdCache(store, base_matrices(target["path"], cfg.svd, False), edit.column_request(cfg), dtype=dtype)
    cache.weights(donor), cache.weights(target)  # one SVD pass per checkpoint for the whole sweep
    once, edit_s, ev = time.perf_counter() - t0, 0.0, 0.0
    edit.apply.forget_resident()
    for v in variants:
        t0 = time.perf_counter()
        with edit.resident(target, torch.float32) as loaded:
            cm = edit.applied(store, cfg, v, loaded, target, donor, dtype=dtype)
            cm.__enter__()
            t1 = time.perf_counter()
            ev += evaluate_both(loaded.model, loaded.tok, hands, cfg) if evaluation else 0.0
            t2 = time.perf_counter()
            cm.__exit__(None, None, None)  # restore + whole-model checksum
        edit_s += (t1 - t0) + (time.perf_counter() - t2)
    return once, edit_s, ev


def authors_edit(method: str, W_t, W_d, k_top: int, k_tail: int):
    """Their per-variant computation: two full fp32 SVDs, then W' rebuilt as U' Σ' V'ᵀ."""
    Ut, St, Vht = torch.linalg.svd(W_t, full_matrices=False)
    Ud, Sd, Vhd = torch.linalg.svd(W_d, full_matrices=False)
    r = St.numel()
    T = list(range(k_top)) + list(range(r - k_tail, r))
    if method == "copy" or len(T) == r:
        return W_d
    if method in ("swap_triplets", "swap_directions"):
        Ut[:, T], Vht[T] = Ud[:, T], Vhd[T]
    if method in ("swap_triplets", "sv_only"):
        St[T] = Sd[T]
    return (Ut * St) @ Vht


def baseline(root: Path, cfg, rows: dict, variants: list[dict], hands: dict) -> tuple[float, float]:
    target, donor = rows["sft-8"], rows["sft-4"]
    matrices = base_matrices(target["path"], cfg.svd, False)
    edit_s = ev = 0.0
    for i, v in enumerate(variants):
        t0 = time.perf_counter()
        wt = load_file(Path(target["path"]) / "model.safetensors")
        wd = load_file(Path(donor["path"]) / "model.safetensors")
        for mat in in_scope(v, matrices, "llama"):
            r = mat.r
            k_top, k_tail = edit.index_set(edit.resolve_edit_k(v["k_top"], r), edit.resolve_edit_k(v["k_tail"], r), r)
            wt[mat.param] = authors_edit(v["method"], wt[mat.param].float(), wd[mat.param].float(), k_top, k_tail).contiguous()
        out = root / f"authors-{i}"
        out.mkdir()
        save_file(wt, out / "model.safetensors", metadata={"format": "pt"})
        for f in Path(target["path"]).iterdir():
            if f.suffix != ".safetensors":
                shutil.copy2(f, out / f.name)
        model, tok = lm.load_model(out), lm.load_tokenizer(out)
        t1 = time.perf_counter()
        ev += evaluate_both(model, tok, hands, cfg)
        edit_s += t1 - t0
        shutil.rmtree(out)
    return edit_s, ev


def main(hidden: int, layers: int, hands: int, max_new_tokens: int, repeat: int = 1) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg, rows, variants, hands_tables = setup(root, hidden, layers, hands, max_new_tokens)
        mats = base_matrices(rows["sft-8"]["path"], cfg.svd, False)
        print(f"tiny Llama: hidden {hidden}, {layers} layers, {len(mats)} matrices of shapes {sorted({m.shape for m in mats})}; "
              f"{len(variants)} variants; {hands} hands per split, max_new_tokens {max_new_tokens}; torch threads {torch.get_num_threads()}; best of {repeat}")  # fmt: skip
        n = len(variants)
        runs_ours, runs_32, runs_theirs = [], [], []
        for rep in range(repeat):  # interleaved, best of `repeat`: the machine may be shared
            svd.SVD_CALLS.clear()
            runs_ours.append(rlheal(root / f"rep-{rep}", cfg, rows, variants, hands_tables))
            n_svd = sum(svd.SVD_CALLS.values())
            runs_32.append(rlheal(root / f"rep32-{rep}", cfg, rows, variants, hands_tables, torch.float32, evaluation=False))
            runs_theirs.append(baseline(root, cfg, rows, variants, hands_tables))
        once, ours, ours_eval = (min(r[i] for r in runs_ours) for i in range(3))
        once32, ours32 = (min(r[i] for r in runs_32) for i in range(2))
        theirs, theirs_eval = (min(r[i] for r in runs_theirs) for i in range(2))
        ours_edit = once + ours
        print(f"  rlheal   edit {ours_edit:7.2f} s = one fp64 SVD pass over B and S {once:.2f} s ({n_svd} SVDs) + {ours / n:.2f} s per variant "
              f"(in-memory edit, restore, checksum)   evaluation {ours_eval:7.2f} s")  # fmt: skip
        print(f"  rlheal fp32 (the GPU dtype; caching alone) edit {once32 + ours32:7.2f} s = SVD pass {once32:.2f} s + {ours32 / n:.2f} s per variant   ratio x{theirs / (once32 + ours32):.2f}")
        print(f"  baseline edit {theirs:7.2f} s = {theirs / n:.2f} s per variant (2 x {len(mats)} fp32 SVDs, full checkpoint written and reloaded)   evaluation {theirs_eval:7.2f} s")
        print(f"  edit ratio x{theirs / ours_edit:.2f} (per variant, SVD pass aside: x{theirs / ours:.2f}); end to end (edit + evaluation) x{(theirs + theirs_eval) / (ours_edit + ours_eval):.2f}")
        grid = 48  # edit variants of the default grid with R present (§4.3)
        print(f"  extrapolated to the {grid}-variant default grid, edit only: rlheal {once + grid * ours / n:.1f} s, baseline {grid * theirs / n:.1f} s, x{grid * theirs / n / (once + grid * ours / n):.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hands", type=int, default=3, help="evaluation hands per split")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=1, help="timings: best of this many interleaved runs")
    args = p.parse_args()
    main(args.hidden, args.layers, args.hands, args.max_new_tokens, args.repeat)
