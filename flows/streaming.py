"""The study's submitted tasks, stage by stage (issue 18): the flow submits a task as soon as
what it reads is sealed and asks the Stream what has ended since it last looked. Prefect's
futures and the task runner (threads, or Dask) do the scheduling: a Stream only remembers
which future is which unit of progress, and mirrors what runs now into the progress file.

A failed task does not stop the others: the flow goes on with everything that does not read
what failed (as `make -k`), so a resumed run has only the failed tasks and what needs them
left to do, and the failure is raised where the flow first asks for the failed stage's
results (an evaluation that fails on one checkpoint leaves the RL runs training).
"""

from __future__ import annotations

import logging
import queue
import shutil
import time
from collections import defaultdict
from typing import Any

from prefect.futures import PrefectFuture

from rlheal.caching import open_store
from rlheal.progress import Progress

log = logging.getLogger("rlheal.flow")
POLL_SECONDS = 0.5  # how long `ended` waits for something to end
RUNNING_EVERY = 2.0  # seconds between two reads of the API for what runs now


class Stream:
    def __init__(self, progress: Progress, expected: dict[str, list[str]]):
        self.progress = progress
        self.pending: dict[PrefectFuture, tuple[str, str | None]] = {}
        self._done: queue.Queue = queue.Queue()  # futures as they end (one callback each, at submit)
        self._results: dict[str, list[Any]] = defaultdict(list)
        self._sealed: list[tuple[str, str | None, str]] = []  # found sealed, not yet handed out
        self._looked = 0.0
        self.failed: list[tuple[str, str | None, BaseException]] = []
        for stage, labels in expected.items():
            progress.expect(stage, labels)
        progress.running({})  # a killed run's last view is not what runs now

    def submit(self, stage: str, label: str | None, task, **kwargs) -> None:
        """Submit `task(**kwargs)`; `label`: the unit of progress it completes (None: the task
        counts its own). A task whose `artifact` is sealed is not submitted: its path is the
        result, handed out by the next `ended()` (the store is the cache; a finished study
        re-runs without a task run per artifact)."""
        art = kwargs.get("artifact")
        if art is not None and sealed(art):
            self._sealed.append((stage, label, str(art.path)))
            return
        future = task.submit(**kwargs)
        self.pending[future] = (stage, label)
        future.add_done_callback(self._done.put)

    def count(self, stage: str) -> int:
        """Tasks of `stage` submitted and not yet handed out by `ended()`."""
        return sum(s == stage for s, _ in self.pending.values()) + sum(s == stage for s, _, _ in self._sealed)

    @property
    def busy(self) -> bool:
        return bool(self.pending or self._sealed)

    def ended(self, timeout: float = POLL_SECONDS) -> list[tuple[str, str | None, Any]]:
        """(stage, label, result) of the tasks that ended well since the last call, after
        waiting at most `timeout` for one; a failed task is kept in `failed` (see `results`)."""
        ended = [(stage, label, lambda p=path: p) for stage, label, path in self._sealed]
        self._sealed = []
        futures = []
        try:
            futures.append(self._done.get(timeout=0 if ended or not self.pending else timeout))
        except queue.Empty:
            pass
        while not self._done.empty():
            futures.append(self._done.get_nowait())
        ended += [(*self.pending.pop(f), f.result) for f in futures if f in self.pending]
        out = []
        for stage, label, result in ended:
            try:
                path = result()
            except Exception as e:
                log.error("%s failed (%s: %s); the study goes on with what does not need it", label or stage, type(e).__name__, e)
                self.failed.append((stage, label, e))
                continue
            self._results[stage].append(path)
            if label is not None:
                self.progress.done(stage, label)
            out.append((stage, label, path))
        self._mirror_running()
        return out

    def failed_in(self, stage: str) -> bool:
        return any(s == stage for s, _, _ in self.failed)

    def results(self, stage: str) -> list[Any]:
        """Every result of `stage`, sorted, once all of its tasks have ended; the first
        failure of one of them is raised here (the others' results are sealed in the store).
        Other stages' tasks that end meanwhile are taken in without the flow seeing them, so
        it is for a stage whose results nothing reacts to, or after the flow's loop."""
        while self.count(stage):
            self.ended()
        if failures := [e for s, _, e in self.failed if s == stage]:
            raise failures[0]
        return sorted(self._results[stage])

    def only(self, stage: str) -> Any:
        (result,) = self.results(stage)
        return result

    def _mirror_running(self) -> None:
        """Which of this flow run's tasks run now, per stage, into the progress file (every
        RUNNING_EVERY seconds): `rlheal run` and `rlheal status` show them."""
        if time.monotonic() - self._looked < RUNNING_EVERY:
            return
        self._looked = time.monotonic()
        try:
            self.progress.running(running_now())
        except Exception as e:  # the display must never fail a study
            log.debug("running tasks not read: %s", e)


def sealed(art) -> bool:
    """Whether `art` is sealed; a sealed artifact's leftover work folder (a kill between the
    seal and the task's own clean-up) is removed, as the task would have."""
    if not open_store(art.root).is_sealed(art):
        return False
    shutil.rmtree(art.work_dir, ignore_errors=True)
    return True


def sealed_or_run(task, artifact, **kwargs) -> str:
    """The artifact's path when it is sealed (no task run: the store is the cache), else what
    the task returns: the stages called one at a time (data, model, svd, the collections)."""
    if sealed(artifact):
        return str(artifact.path)
    return task(artifact=artifact, **kwargs)


def running_now() -> dict[str, list[str]]:
    """Names of this flow run's task runs in state RUNNING, by their `stage:` tag."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState, TaskRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.client is None:
        return {}
    runs = ctx.client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[ctx.flow_run.id])),
        task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING]))),
    )
    out: dict[str, list[str]] = defaultdict(list)
    for r in runs:
        stage = next((t.split(":", 1)[1] for t in r.tags if t.startswith("stage:")), None)
        if stage is not None:
            out[stage].append(r.name)
    return {s: sorted(names) for s, names in out.items()}
