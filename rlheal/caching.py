"""The stage contract: a stage declares its name, code version and tables (`Stage`); its key
hashes the config slice it reads and the ids of the artifacts it reads; the flow derives that
key once (`Stage.artifact`) and hands the artifact to the task, which builds it or finds it
sealed (`Stage.build`). The same artifact is the task's Prefect cache key (`StoreCachePolicy`).

A task is a cache hit exactly when its artifact is sealed and intact, across processes and
flow runs. The policy stands alone on purpose: composed with another policy
(`StoreCachePolicy() + TASK_SOURCE`) a `None` key from one part is silently dropped and
stale results come back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from rlheal.store import Artifact, Store

_stores: dict[Path, Store] = {}


def open_store(root: str | Path) -> Store:
    """One Store per root and process, so checksum verification is memoised."""
    root = Path(root).expanduser().absolute()
    if root not in _stores:
        _stores[root] = Store(root)
    return _stores[root]


@dataclass(frozen=True)
class Stage:
    """What a stage declares. `name` is its one name: store folder, Prefect task, tag, progress
    row, config section where it has one. Bump `version` when a change alters what the stage
    writes (its sealed artifacts are then rebuilt); `tables` are the Parquet tables it
    publishes into the study (`studies/<name>/tables/`)."""

    name: str
    version: str
    tables: tuple[str, ...] = ()

    def artifact(self, store: Store, config: Mapping[str, Any], inputs: Iterable[Artifact | str] = ()) -> Artifact:
        """The artifact's address: a hash of the stage, its version, the config slice and what
        it reads: artifacts (by id), or content keys `kind:...` (a checkpoint's hash, say)."""
        ids = []
        for i in inputs:
            if not isinstance(i, Artifact) and ":" not in str(i):
                # a path here would key the artifact by where a store lives, not by what it holds
                raise TypeError(f"stage {self.name!r}: an input is an Artifact or a content key 'kind:...', got {i!r}")
            ids.append(i.id if isinstance(i, Artifact) else i)
        return store.artifact(self.name, config, ids, self.version)

    def build(self, art: Artifact, builder: Callable[[Path], Mapping[str, Any] | None]) -> Path:
        """The sealed artifact: found, or built by `builder(tmp_dir)` and sealed (`Store.build`)."""
        if art.stage != self.name:
            raise ValueError(f"stage {self.name!r} was handed an artifact of stage {art.stage!r}")
        return open_store(art.root).build(art, builder)


def results_dir(root: str | Path) -> Path:
    return Path(root) / ".prefect" / "results"


@dataclass
class StoreCachePolicy(CachePolicy):
    """Key = the id of the artifact passed as the task's `artifact` argument."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        if "artifact" not in inputs:
            raise TypeError(f"task {task_ctx.task.name!r} uses StoreCachePolicy but has no `artifact` argument")
        art = inputs["artifact"]
        art = art if isinstance(art, Artifact) else Store.from_path(art)
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
