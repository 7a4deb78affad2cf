"""The checks `rlheal run` makes before it writes anything; `rlheal validate` makes the same
ones (`check`). Each failure is bad input, exit status 2, with nothing written:

- the store: it, or the nearest folder above it, must be a folder one can write in;
- the task: its benchmark builds from the config (`virl.routes`: a routes file in the
  authors' schema, refused with the file and field named);
- the model: present on disk (`model.name_or_path`), with the shapes the svd section needs
  (a pattern that selects no matrix, a k no selected matrix admits);
- the study name: not already run in this store with another config (unless --force);
- the space: the store's filesystem must have room for what the study still has to write,
  estimated per stage from the model's shapes and the config (rlheal/space.py).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from rlheal import space
from rlheal.config import StudyConfig
from rlheal.store import Store, StoreError
from tasks import benchmark

def check(cfg: StudyConfig, force: bool = False, space_check: bool = True, out: TextIO | None = None) -> space.Estimate:
    """Run every pre-run check; print the store-space estimate to `out` (stdout) and return it.
    `space_check=False` prints the estimate without refusing a store that looks too small."""
    store = Store(cfg.store)
    store.check_usable()
    benchmark.of(cfg).check(cfg)
    model, columns, sweep = inspect_model(cfg)
    store.check_claim(cfg.name, cfg.claim(), force)
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
    from tasks import edit, model, sft
    from tasks.svd.engine import columns_plan
    from tasks.svd.matrices import check_k, model_shapes, select_matrices

    from rlheal.store import Store

    built = model.artifact(Store(cfg.store), cfg)  # a re-run reads the study's own model: nothing to build
    with tempfile.TemporaryDirectory(prefix="rlheal-preflight-") as tmp:
        if cfg.model.builtin and Store(cfg.store).is_sealed(built):
            path = model.model_dir(built.path)
        elif cfg.model.builtin:
            path = Path(tmp)
            quiet = logging.getLogger("rlheal.model")
            quiet.disabled = True  # a throw-away copy for its shapes: not the study's model stage
            try:
                model.build_tiny(path, cfg)
            finally:
                quiet.disabled = False
        else:
            path = model.resolve_pretrained(cfg.model)
        matrices = select_matrices(path, cfg.svd)
        check_k(cfg.svd, matrices)
        shapes = model_shapes(path, matrices, copied=bool(cfg.model.builtin))
        sweep = edit.sweep_size(cfg, path) | {"sft_bytes": sft.save_bytes(cfg.sft, path)}
    columns = columns_plan(cfg, list(shapes.matrices), list(shapes.others), edit.column_requests(cfg))
    return shapes, columns, sweep
