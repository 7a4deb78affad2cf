"""Checks that need the model's shapes, run by `rlheal run` before anything is written:
a pattern that selects no matrix, or a k no selected matrix admits, is bad input (exit 2)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from rlheal.config import ConfigError, StudyConfig


def check(cfg: StudyConfig) -> None:
    from tasks import models
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
