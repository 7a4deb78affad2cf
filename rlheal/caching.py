"""A Prefect cache policy that delegates to the artifact store.

A task is a cache hit exactly when its artifact is sealed and intact, across
processes and flow runs. The policy stands alone on purpose: composed with
another policy (`StoreCachePolicy() + TASK_SOURCE`) a `None` key from one part
is silently dropped and stale results come back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from rlheal.store import Store

_stores: dict[Path, Store] = {}


def open_store(root: str | Path) -> Store:
    """One Store per root and process, so checksum verification is memoised."""
    root = Path(root).expanduser().absolute()
    if root not in _stores:
        _stores[root] = Store(root)
    return _stores[root]


def results_dir(root: str | Path) -> Path:
    return Path(root) / ".prefect" / "results"


@dataclass
class StoreCachePolicy(CachePolicy):
    """Key = the artifact id passed as the task's `artifact` argument."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        if "artifact" not in inputs:
            raise TypeError(f"task {task_ctx.task.name!r} uses StoreCachePolicy but has no `artifact` argument")
        art = Store.from_path(inputs["artifact"])
        key = art.id
        if not open_store(art.root).is_sealed(art):
            # The artifact is missing or damaged: a result record from an earlier run
            # would make Prefect report Cached and hand back a path to nothing.
            (results_dir(art.root) / key).unlink(missing_ok=True)
        return key


def cached_in(store: Store) -> dict[str, Any]:
    """`task.with_options(**cached_in(store))`: results persisted inside the store itself,
    so the cache travels with the store (another process, a Dask worker on a shared disk)."""
    return {
        "cache_policy": StoreCachePolicy(),
        "persist_result": True,
        "result_storage": results_dir(store.root),
        "result_serializer": "json",
    }
