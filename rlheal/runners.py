"""Task runners: threads in the flow's process, or an existing engine (Dask via prefect-dask).

Never a home-made scheduler: a `LocalCluster` for one machine, or the address of a
running Dask cluster (dask-jobqueue on SLURM, dask-kubernetes, ...). The store must then
be on a filesystem every worker sees.
"""

from __future__ import annotations

import contextlib

from prefect.task_runners import ThreadPoolTaskRunner

from rlheal.config import RunnerSection


def task_runner(r: RunnerSection):
    if r.kind == "local":
        return ThreadPoolTaskRunner(max_workers=r.n_workers)
    import dask
    from prefect_dask import DaskTaskRunner

    # Dask's nanny starts every worker with MALLOC_TRIM_THRESHOLD_=65536 (to hand memory back
    # to the OS), which also switches off glibc's adaptive mmap threshold: every tensor over
    # 128 kB then comes from a fresh mmap, and a CPU worker ran PPO 2.2x slower, in ~300,000
    # page faults a second. None unsets it (distributed's own convention).
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    if r.address:
        return DaskTaskRunner(address=r.address)
    kwargs = {"n_workers": r.n_workers, "threads_per_worker": r.threads_per_worker, "processes": True, "dashboard_address": None}
    if r.gpus_per_task:
        kwargs["resources"] = {"GPU": r.gpus_per_task}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def gpu_slot(r: RunnerSection):
    """Pin GPU work one task per GPU through Dask worker resources (workers started with
    `--resources GPU=1`); a no-op for the local runner."""
    if r.kind != "dask" or not r.gpus_per_task:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"GPU": r.gpus_per_task})
