"""Task runners: threads in the flow's process, or an existing engine (Dask via prefect-dask).

Never a home-made scheduler: a `LocalCluster` for one machine, or the address of a
running Dask cluster (dask-jobqueue on SLURM, dask-kubernetes, ...). The store must then
be on a filesystem every worker sees.
"""

from __future__ import annotations

import contextlib
import threading

from prefect.task_runners import ThreadPoolTaskRunner

from rlheal.config import RunnerSection


def task_runner(r: RunnerSection):
    if r.kind == "local":
        return ThreadPoolTaskRunner(max_workers=r.n_workers)
    from prefect_dask import DaskTaskRunner

    if r.address:  # a cluster started elsewhere: its workers' environment is its own
        return DaskTaskRunner(address=r.address)
    import dask

    # Dask's nanny starts every worker with MALLOC_TRIM_THRESHOLD_=65536 (to hand memory back
    # to the OS), which also switches off glibc's adaptive mmap threshold: every tensor over
    # 128 kB then comes from a fresh mmap, and PPO on a CPU worker ran 2.2x slower, the
    # machine at ~300,000 page faults a second. None unsets it (distributed's convention);
    # the nanny reads it when the runner starts the cluster, so it is set for the process.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    # The workers report to the flow's own API, a temporary one too: without it each worker
    # started a temporary server of its own on the same database.
    env = {"PREFECT_API_URL": url} if (url := api_url()) else {}
    kwargs = {
        "n_workers": r.n_workers, "threads_per_worker": r.threads_per_worker, "processes": True, "dashboard_address": None, "env": env,
        "preload": ["rlheal.workers"],  # the stages' INFO lines, as the flow's process prints them
    }  # fmt: skip
    if r.gpus_per_task:
        kwargs["resources"] = {"GPU": r.gpus_per_task}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def api_url() -> str | None:
    """The Prefect API this process talks to: the configured one, or inside a flow run the
    flow's client's (the temporary server a run without PREFECT_API_URL starts)."""
    from prefect.context import FlowRunContext
    from prefect.settings import get_current_settings

    if url := get_current_settings().api.url:
        return url
    ctx = FlowRunContext.get()
    return str(ctx.client.api_url).rstrip("/") if ctx is not None and ctx.client is not None else None


def gpu_slot(r: RunnerSection):
    """Pin GPU work one task per GPU through Dask worker resources (workers started with
    `--resources GPU=1`); a no-op for the local runner."""
    if r.kind != "dask" or not r.gpus_per_task:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"GPU": r.gpus_per_task})


# The thread runner is one process: its GPU tasks take turns on this lock. DECISION: not a
# Prefect global concurrency limit, whose slot count lives in the server's database while
# its leases live in the server's memory: a run killed while holding the slot (a temporary
# server dies with it) left the slot taken and every later GPU task waiting forever (review
# of issue 18).
_GPU = threading.Lock()


def _local_gpu(r: RunnerSection, cuda: bool | None) -> bool:
    if r.kind != "local":
        return False  # Dask pins GPU work through worker resources (`gpu_slot`)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return cuda


@contextlib.contextmanager
def gpu_lease(r: RunnerSection, cuda: bool | None = None):
    """Hold the GPU for the body of a GPU task on the thread runner of a CUDA machine (every
    task there runs on cuda:0; more GPUs: Dask with `gpus_per_task`); a no-op elsewhere. The
    streaming flow submits SFT, RL and evaluations at once: on one device they take turns,
    each with the whole GPU."""
    if not _local_gpu(r, cuda):
        yield
        return
    with _GPU:
        yield
