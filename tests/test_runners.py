"""Task runners (rlheal/runners.py): an existing engine, started the way rlheal needs it."""

import logging
import os

from rlheal.config import RunnerSection
from rlheal.runners import task_runner


def _worker_env(runner) -> dict:
    """What one real worker process of the runner's LocalCluster sees."""
    from distributed import Client, LocalCluster

    def probe():
        keys = ("MALLOC_TRIM_THRESHOLD_", "MKL_NUM_THREADS", "PREFECT_API_URL")
        return {k: os.environ.get(k) for k in keys} | {"rlheal_level": logging.getLogger("rlheal").getEffectiveLevel()}

    with LocalCluster(**(runner.cluster_kwargs | {"n_workers": 1})) as cluster, Client(cluster) as client:
        (env,) = client.run(probe).values()
    return env


def test_dask_workers_keep_glibcs_adaptive_malloc_and_report_to_the_flows_api(prefect_api, monkeypatch):
    """Dask's nanny starts each worker with MALLOC_TRIM_THRESHOLD_=65536, which also turns off
    glibc's adaptive mmap threshold: every tensor over 128 kB then came from a fresh mmap and
    PPO on a CPU worker ran 2.2x slower. Without the flow's API URL each worker started a
    Prefect server of its own."""
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)  # the API is the harness's settings context, as a flow's temporary server is
    env = _worker_env(task_runner(RunnerSection(kind="dask", n_workers=1)))
    assert env["MALLOC_TRIM_THRESHOLD_"] is None, env
    assert env["MKL_NUM_THREADS"] == "1", env  # the rest of Dask's worker environment stays (nothing else sets it)
    assert env["PREFECT_API_URL"] == prefect_api, env
    assert env["rlheal_level"] == logging.INFO, env  # the stages' progress lines are printed


def test_a_cluster_started_elsewhere_is_only_addressed():
    runner = task_runner(RunnerSection(kind="dask", address="tcp://127.0.0.1:1"))
    assert runner.address == "tcp://127.0.0.1:1" and not runner.cluster_kwargs


def test_inside_a_flow_without_an_api_setting_the_workers_get_the_flows_temporary_server(monkeypatch):
    """`rlheal run` without PREFECT_API_URL: the flow's temporary server is the workers' API."""
    from prefect import flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from rlheal.runners import api_url

    @flow
    def probe() -> str | None:
        return api_url()

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert api_url() is None
        url = probe()
    assert url and url.startswith("http://127.0.0.1:") and url.endswith("/api"), url


def test_gpu_tasks_on_the_thread_runner_take_turns():
    """Issue 18: the streaming flow submits GPU tasks at once; on one CUDA machine with the
    thread runner they hold the GPU one at a time (CUDA forced on: the lease is under test),
    and every GPU stage's task takes it."""
    import inspect
    import threading
    import time

    from rlheal.config import RunnerSection
    from rlheal.runners import gpu_lease
    from tasks import eval, rl, sft
    from tasks.edit import sweep
    from tasks.svd import analysis

    local = RunnerSection(kind="local", n_workers=3)
    spans, lock = [], threading.Lock()

    def job():
        with gpu_lease(local, cuda=True):
            start = time.monotonic()
            time.sleep(0.3)
            with lock:
                spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    spans.sort()
    assert len(spans) == 3
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), f"GPU tasks overlapped: {spans}"
    # without CUDA, and on Dask (which pins GPUs by worker resources), the lease holds nothing
    with gpu_lease(local, cuda=False), gpu_lease(local, cuda=False), gpu_lease(RunnerSection(kind="dask"), cuda=True):
        pass
    for stage in (sft.stage, rl.stage, eval.stage, analysis.stage, analysis.decompose_stage, sweep.stage):
        assert "with gpu_lease(cfg.runner):" in inspect.getsource(stage.fn), stage.name
