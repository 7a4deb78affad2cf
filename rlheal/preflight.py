"""The checks `rlheal run` makes before it writes anything; `rlheal validate` makes the same
ones (`check`). Each failure is bad input, exit status 2, with nothing written:

- the store: it, or the nearest folder above it, must be a folder one can write in;
- the model: present on disk (`model.name_or_path`), with the shapes the svd section needs
  (a pattern that selects no matrix, a k no selected matrix admits);
- the study name: not already run in this store with another config (unless --force);
- the space: the store's filesystem must have room for what the study still has to write,
  estimated per stage from the model's shapes and the config (rlheal/space.py).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from rlheal import space
from rlheal.config import ConfigError, StudyConfig
from rlheal.store import Store, StoreError

# Top-level files of a model directory that a checkpoint does not carry.
_NOT_CARRIED = ("README", "LICENSE", "USE_POLICY", "NOTICE", ".gitattributes")
_CARRIED = (".json", ".jinja", ".txt", ".model", ".tiktoken")


def check(cfg: StudyConfig, force: bool = False, space_check: bool = True, out: TextIO | None = None) -> space.Estimate:
    """Run every pre-run check; print the store-space estimate to `out` (stdout) and return it.
    `space_check=False` prints the estimate without refusing a store that looks too small."""
    store = Store(cfg.store)
    store.check_usable()
    model, columns, sweep = inspect_model(cfg)
    store.check_claim(cfg.name, cfg.model_dump(mode="json", exclude={"store"}), force)
    import torch

    est = space.estimate(cfg, model, columns, cuda=torch.cuda.is_available(), **sweep)
    free = space.free_bytes(store.root)
    needed = est.still_needed(done_fractions(store, cfg.name))
    print(space.format_estimate(est, store.root, free, needed), file=out or sys.stdout, flush=True)
    if space_check and free < needed:
        raise StoreError(
            f"{store.root}: the store's filesystem has {space.human(free)} free, and study {cfg.name!r} needs about "
            f"{space.human(needed)} there (per stage above); free some space or choose another --store "
            "(--no-space-check runs anyway, e.g. when the estimate is known to be too high)"
        )
    return est


def done_fractions(store: Store, study: str) -> dict[str, float]:
    """Stage -> fraction of its units already sealed, from the study's progress record (a
    resumed run needs room only for the rest)."""
    from rlheal.progress import Progress

    return {stage: done / total for stage, (done, total) in Progress(store.study_dir(study), study).summary().items() if total}


def inspect_model(cfg: StudyConfig) -> tuple[space.ModelShapes, dict, dict]:
    """The model's shapes (safetensors headers; the builtin model is built into a throw-away
    folder), checked against the svd section; returns (shapes, the svd cache's columns per
    kind of object, the editing sweep's counts for `space.estimate`)."""
    from tasks import models
    from tasks.svd.engine import columns_plan
    from tasks.svd.matrices import select_matrices

    with tempfile.TemporaryDirectory(prefix="rlheal-preflight-") as tmp:
        if cfg.model.builtin:
            path = Path(tmp)
            quiet = logging.getLogger("rlheal.model")
            quiet.disabled = True  # a throw-away copy for its shapes: not the study's model stage
            try:
                models.build_tiny(path, cfg.model)
            finally:
                quiet.disabled = False
        else:
            path = models.resolve_pretrained(cfg.model)
        matrices = select_matrices(path, cfg.svd)
        largest = max(m.r for m in matrices)
        for i, k in enumerate(cfg.svd.k):
            if isinstance(k, int) and k >= largest:
                raise ConfigError(f"svd.k[{i}]: k = {k} is not below min(m, n) of any selected matrix (the largest is {largest}); principal angles need 1 <= k < min(m, n)")
        shapes = model_shapes(path, matrices, copied=bool(cfg.model.builtin))
        sweep = editing_sweep(cfg, path)
    columns = columns_plan(cfg, list(shapes.matrices), list(shapes.others))
    return shapes, columns, sweep


def model_shapes(path: Path, matrices: list, copied: bool) -> space.ModelShapes:
    """`space.ModelShapes` of the model directory at `path`, from its headers and file sizes."""
    from tasks.svd.matrices import MULTIMODAL, every_matrix, tensor_index

    config = json.loads((path / "config.json").read_text())
    mllama = config.get("model_type") == "mllama"
    # A Mllama's checkpoints (and the model stage's copy) hold its language model only.
    index = {n: i for n, i in tensor_index(path).items() if not (mllama and MULTIMODAL.fullmatch(n))}
    tensors = tuple((n, _numel(i.shape), space.DTYPE_BYTES.get(i.dtype, 4)) for n, i in sorted(index.items()))
    files = sum(
        f.stat().st_size
        for f in path.iterdir()
        if f.is_file() and f.suffix in _CARRIED and not f.name.startswith(_NOT_CARRIED) and not f.name.endswith(".index.json")
    )
    selected = {m.param for m in matrices}
    others = tuple((m.m, m.n) for m in every_matrix(path) if m.param not in selected and m.param in index)
    hidden = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size") or 0
    return space.ModelShapes(tensors, files, tuple((m.m, m.n) for m in matrices), others, int(hidden), copied or mllama)


def editing_sweep(cfg: StudyConfig, path: Path) -> dict:
    """The editing sweep's size (`tasks.editing.variants` on stand-in roles) and, for
    keep_checkpoints, the kind of checkpoint each target is; plus sft.save_dtype's bytes."""
    import polars as pl

    from tasks.editing.apply import n_layers
    from tasks.editing.grid import variants

    n_sft = sum(1 for s in cfg.sft.save_steps if s > 0)
    ids = {"base": "base", "B": "sft-B" if n_sft > 1 else "sft-S", "S": "sft-S"} | ({"R": "rl-R"} if space.has_r(cfg) else {})
    roles = pl.DataFrame({"role": list(ids), "ckpt_id": list(ids.values())})
    sweep = variants(cfg, roles, n_layers(path)) if cfg.editing.enabled and n_sft else []
    kinds = {v["target_role"]: {"base": "base", "R": "rl"}.get(v["target_role"], "sft") for v in sweep if v["method"] != "none"}
    return {
        "editing_roles": kinds,
        "n_variants": sum(v["method"] != "none" for v in sweep),
        "n_baselines": sum(v["method"] == "none" for v in sweep),
        "sft_bytes": sft_save_bytes(cfg, path),
    }


def sft_save_bytes(cfg: StudyConfig, path: Path) -> int:
    """Bytes per value of `sft.save_dtype` (`auto`: the starting model's, as tasks.sft reads it)."""
    if cfg.sft.save_dtype != "auto":
        return space.TORCH_DTYPE_BYTES[cfg.sft.save_dtype]
    import torch

    from tasks.sft import save_dtype

    return torch.empty(0, dtype=save_dtype(cfg.sft, path)).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
