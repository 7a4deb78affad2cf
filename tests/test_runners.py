"""Task runners (rlheal/runners.py): an existing engine, started the way rlheal needs it."""

import os

from rlheal.config import RunnerSection
from rlheal.runners import task_runner


def test_dask_workers_keep_glibcs_adaptive_malloc():
    """Dask's nanny starts each worker with MALLOC_TRIM_THRESHOLD_=65536, which also turns off
    glibc's adaptive mmap threshold: every tensor over 128 kB then came from a fresh mmap and
    PPO on a CPU worker ran 2.2x slower (~300,000 page faults a second). The runner unsets it;
    a real worker process shows what it got."""
    from distributed import Client, LocalCluster

    runner = task_runner(RunnerSection(kind="dask", n_workers=1))
    kwargs = runner.cluster_kwargs | {"n_workers": 1, "threads_per_worker": 1}
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        (env,) = client.run(lambda: {k: os.environ.get(k) for k in ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS")}).values()
    assert env["MALLOC_TRIM_THRESHOLD_"] is None, env
    assert env["OMP_NUM_THREADS"] == "1"  # the rest of Dask's worker environment stays
