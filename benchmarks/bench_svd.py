"""SVD analysis cost: rlheal's decompose-once cache against recomputing SVDs per pair.

    python benchmarks/bench_svd.py [--hidden 512] [--layers 4] [--checkpoints 8]
    python benchmarks/bench_svd.py --gpu     # CUDA: Qwen2.5-0.5B-shaped weights, batched vs unbatched

CPU part: a tiny Llama (GQA) and `--checkpoints` perturbed copies of it, like an SFT
trajectory. Two workloads: every checkpoint against the reference, and the stage's default
comparison plan (base -> each, B -> each later, B = the middle checkpoint). Both sides run the
same measurement code (`weight_metrics` at the default k-grid); they differ only in where the
factors come from:
- rlheal: each checkpoint decomposed once into the on-disk cache (fp64, the CPU default; and
  fp32, the GPU dtype, to isolate the gain from caching alone), then every pair measured;
- baseline (the authors' way): both full SVDs recomputed in fp32 for every pair, no cache.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import polars as pl
import torch
from safetensors.torch import load_file, save_file

from rlheal.config import parse_config
from rlheal.store import Store
from tasks import lm, model, svd
from tasks.svd.engine import SvdCache, decompose
from tasks.svd.metrics import Factors, weight_metrics
from tasks.svd.roles import plan_comparisons

K_SPECS = [0.0625, 0.125, 0.25]


def tiny_trajectory(root: Path, hidden: int, layers: int, n_ckpts: int) -> tuple:
    cfg = parse_config({
        "name": "bench",
        "model": {"builtin": "tiny", "tiny": {"hidden_size": hidden, "intermediate_size": hidden * 8 // 3, "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2}},
    })  # fmt: skip
    base = root / "base"
    model.build_tiny(base, cfg)
    weights = load_file(base / "model.safetensors")
    rows = [{"ckpt_id": "base", "stage": "base", "step": 0, "parent": None, "path": str(base)}]
    g = torch.Generator().manual_seed(0)
    for i in range(1, n_ckpts + 1):
        weights = {k: v + 1e-2 * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 else v for k, v in weights.items()}
        out = root / f"sft-{i}"
        out.mkdir()
        (out / "config.json").write_text((base / "config.json").read_text())
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
        rows.append({"ckpt_id": f"sft-{i}", "stage": "sft", "step": i, "parent": "base", "path": str(out)})
    ckpts = pl.DataFrame(rows, schema_overrides={"step": pl.Int32, "parent": pl.String}).with_columns(
        content_hash=pl.col("path").map_elements(lambda p: lm.weights_hash(Path(p)), return_dtype=pl.String)
    )
    return cfg, ckpts


def rlheal_pairs(store: Store, matrices, rows: dict, pairs, dtype, device="cpu", batched=False) -> float:
    t0 = time.perf_counter()
    cache = SvdCache(store, matrices, svd.ColumnRequest(top=tuple(K_SPECS)), device, dtype, batched)
    cached = {c: cache.weights(rows[c]) for c in dict.fromkeys(c for pair in pairs for c in pair)}
    for mat in matrices:
        for a, b in pairs:
            weight_metrics(cache.weight(rows[a], mat), cache.weight(rows[b], mat), cached[a].factors(mat), cached[b].factors(mat), K_SPECS)
    _sync(device)
    return time.perf_counter() - t0


def baseline_pairs(matrices, rows: dict, pairs, device="cpu") -> float:
    """Per pair: load both models, two fresh fp32 SVDs of every matrix, measure, forget."""
    t0 = time.perf_counter()
    for a, b in pairs:
        wa = load_file(Path(rows[a]["path"]) / "model.safetensors", device=str(device))
        wb = load_file(Path(rows[b]["path"]) / "model.safetensors", device=str(device))
        for mat in matrices:
            Wa, Wb = wa[mat.param].float(), wb[mat.param].float()
            fa = Factors.from_svd(*torch.linalg.svd(Wa, full_matrices=False))
            fb = Factors.from_svd(*torch.linalg.svd(Wb, full_matrices=False))
            weight_metrics(Wa, Wb, fa, fb, K_SPECS)
    _sync(device)
    return time.perf_counter() - t0


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run_cpu(hidden: int, layers: int, n_ckpts: int, repeat: int = 1) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg, ckpts = tiny_trajectory(root, hidden, layers, n_ckpts)
        rows = {r["ckpt_id"]: r for r in ckpts.to_dicts()}
        matrices = svd.select_matrices(rows["base"]["path"], cfg.svd)
        shapes = sorted({m.shape for m in matrices})
        print(f"tiny Llama: hidden {hidden}, {layers} layers, {len(matrices)} matrices of shapes {shapes}; "
              f"{n_ckpts} checkpoints + reference; k-grid {K_SPECS}; torch threads {torch.get_num_threads()}")  # fmt: skip
        b_id = f"sft-{(n_ckpts + 1) // 2}"
        roles = pl.DataFrame([{"role": "base", "ckpt_id": "base", "step": 0}, {"role": "B", "ckpt_id": b_id, "step": (n_ckpts + 1) // 2}, {"role": "S", "ckpt_id": f"sft-{n_ckpts}", "step": n_ckpts}])
        workloads = {
            "reference vs each": [("base", f"sft-{i}") for i in range(1, n_ckpts + 1)],
            "stage default plan": plan_comparisons(roles, ckpts, noise_control=False).weights,
        }
        for name, pairs in workloads.items():
            n_objects = len({c for p in pairs for c in p})
            times: dict[str, list[float]] = {"64": [], "32": [], "base": []}
            for rep in range(repeat):  # interleaved, best of `repeat`: the machine may be shared
                times["64"].append(rlheal_pairs(Store(root / f"s64-{name[:3]}-{rep}"), matrices, rows, pairs, torch.float64))
                times["32"].append(rlheal_pairs(Store(root / f"s32-{name[:3]}-{rep}"), matrices, rows, pairs, torch.float32))
                times["base"].append(baseline_pairs(matrices, rows, pairs))
            t64, t32, base = (min(times[k]) for k in ("64", "32", "base"))
            print(f"\n{name}: {len(pairs)} pairs; rlheal decomposes {n_objects} checkpoints, the baseline {2 * len(pairs)} "
                  f"(bound for caching alone if measuring were free: x{2 * len(pairs) / n_objects:.2f}); best of {repeat}")
            print(f"  rlheal fp64 (CPU default), cached : {t64:7.2f} s   ratio x{base / t64:.2f}")
            print(f"  rlheal fp32 (GPU dtype), cached   : {t32:7.2f} s   ratio x{base / t32:.2f}  <- caching alone")
            print(f"  baseline fp32, recompute per pair : {base:7.2f} s")
        summary = pl.DataFrame([{"ckpt_id": c, "split": s, "n": 100, "k": 10 * i % 100, "accuracy": (10 * i % 100) / 100, "ce": 1.0} for i, c in enumerate(rows) for s in ("id", "ood")])
        store = Store(root / "stage")
        t0 = time.perf_counter()
        out = svd.run(store, cfg, ckpts, summary)
        first = time.perf_counter() - t0
        svd.SVD_CALLS.clear()
        t0 = time.perf_counter()
        svd.run(store, cfg.model_copy(update={"svd": cfg.svd.model_copy(update={"k": [0.125]})}), ckpts, summary)
        again = time.perf_counter() - t0
        rows_out = json.loads((out / "manifest.json").read_text())["rows"]
        print(f"\nwhole stage svd.run() (fp64, noise control, all tables {rows_out}): {first:.2f} s; "
              f"a second analysis with another k-grid: {again:.2f} s, {sum(svd.SVD_CALLS.values())} SVDs")  # fmt: skip


# ---------------------------------------------------------------------------- GPU

QWEN_LAYERS = 24
QWEN_05B = {"q_proj": (896, 896), "k_proj": (128, 896), "v_proj": (128, 896), "o_proj": (896, 896), "gate_proj": (4864, 896), "up_proj": (4864, 896), "down_proj": (896, 4864)}


def qwen_shaped(root: Path, name: str, seed: int, base: dict | None = None) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(QWEN_LAYERS):
        for module, shape in QWEN_05B.items():
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"model.layers.{layer}.{block}.{module}.weight"
            w = torch.randn(shape, generator=g) * 0.02
            tensors[key] = (base[key].float() + 1e-3 * w if base else w).to(torch.bfloat16)
    out = root / name
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out, tensors


def run_gpu(memory_gib: float, device: str = "cuda") -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")
    dev = torch.device(device)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a, wa = qwen_shaped(root, "a", 0)
        b, _ = qwen_shaped(root, "b", 1, wa)
        del wa
        cfg = parse_config({"name": "bench", "model": {"name_or_path": str(a)}, "svd": {"batch_memory_gib": memory_gib}})
        matrices = svd.select_matrices(a, cfg.svd)
        rows = {c: {"ckpt_id": c, "path": str(p), "content_hash": lm.weights_hash(p)} for c, p in (("a", a), ("b", b))}
        print(f"Qwen2.5-0.5B-shaped random weights (bf16): {len(matrices)} matrices, {name}; fp32 SVD, batch cap {memory_gib} GiB")

        def one_pass(batched: bool) -> float:
            _sync(dev)
            t0 = time.perf_counter()
            for _ in decompose(matrices, lambda m: svd.engine.read_tensor(a, m.param, dev), "a", dev, torch.float32, batched, memory_gib):
                pass
            _sync(dev)
            return time.perf_counter() - t0

        one_pass(False)  # warm-up: cuSOLVER handles and workspaces
        unb = min(one_pass(False) for _ in range(2))
        bat = min(one_pass(True) for _ in range(2))
        print(f"  full-model SVD pass, unbatched: {unb:6.2f} s")
        print(f"  full-model SVD pass, batched  : {bat:6.2f} s   ratio x{unb / bat:.2f}")
        peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
        ours = rlheal_pairs(Store(root / "store"), matrices, rows, [("a", "b")], torch.float32, dev, batched=True)
        base = baseline_pairs(matrices, rows, [("a", "b")], dev)
        print(f"  pair analysis, rlheal (batched, cache written): {ours:6.2f} s; baseline (2 unbatched passes, no cache): {base:6.2f} s")
        print(f"  peak GPU memory {peak:.2f} GiB")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--checkpoints", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="timings: best of this many interleaved runs")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--batch-memory-gib", type=float, default=4.0)
    args = p.parse_args()
    if args.gpu:
        run_gpu(args.batch_memory_gib)
    else:
        run_cpu(args.hidden, args.layers, args.checkpoints, args.repeat)
