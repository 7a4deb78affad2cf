"""A real Prefect server on loopback: work pool, `prefect deploy` from deployments.yaml,
a process worker, the smoke deployment triggered and read back through the API."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} not healthy after {timeout} s")


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url, proc)
        yield {**env, "PREFECT_API_URL": url, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def prefect(*args, env, timeout=120) -> str:
    r = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"prefect {' '.join(args)}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_deployments_file_is_valid_for_prefect(tmp_path):
    spec = yaml.safe_load((ROOT / "deployments.yaml").read_text())
    names = {d["name"] for d in spec["deployments"]}
    assert names == {"smoke", "toy", "paper-qwen2.5-7b", "paper-llama3.2-11b"}
    for d in spec["deployments"]:
        assert d["entrypoint"] == "flows/study.py:study" and (ROOT / d["parameters"]["config_path"]).is_file()
        assert d["work_pool"]["name"] == "rlheal"
    assert any(s["cron"] for d in spec["deployments"] for s in d.get("schedules", []))


@pytest.mark.integration  # a server, a worker and a whole smoke study: `make test-integration`
def test_deploy_worker_and_run_the_smoke_deployment(server, tmp_path):
    env = {**server, "RLHEAL_HOME": str(ROOT)}
    store = tmp_path / "store"
    prefect("work-pool", "create", "rlheal", "--type", "process", env=env)
    out = prefect("deploy", "--prefect-file", "deployments.yaml", "--all", "--no-prompt", env=env, timeout=180)
    assert "smoke" in out
    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "rlheal", "--limit", "1"], env=env, cwd=ROOT, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out = prefect("deployment", "run", "rlheal-study/smoke", "--param", f"store={store}", env=env)
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("rlheal-study/toy")
            assert deployment.schedules and not deployment.schedules[0].active  # nightly, paused by default
            run_id = next(line.split()[-1] for line in out.splitlines() if "UUID" in line)
            deadline = time.time() + 400
            while True:
                run = client.read_flow_run(run_id)
                if run.state.is_final():
                    break
                assert time.time() < deadline, f"flow run still {run.state.name}"
                time.sleep(2)
            assert run.state.is_completed(), (tmp_path / "worker.log").read_text()[-3000:]
            keys = {a.key for a in client.read_artifacts()}
        assert {"smoke-eval-summary", "smoke-report", "smoke-eval-progress"} <= keys
        summary = store / "studies" / "smoke" / "tables" / "eval_summary.parquet"
        assert summary.is_file() and (store / "studies" / "smoke" / "report" / "report.md").is_file()
        progress = json.loads((store / "studies" / "smoke" / "progress.json").read_text())
        assert len(progress["eval"]["done"]) == len(progress["eval"]["total"]) == 18  # 3 SFT + 6 RL checkpoints x 2 splits
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(30)
