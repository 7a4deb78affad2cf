"""Shared test setup: offline, one torch thread, an isolated Prefect home, and one
Prefect API server for the whole session (it takes ~15 s to start)."""

import os
import tempfile
from pathlib import Path

_home = Path(tempfile.mkdtemp(prefix="rlheal-prefect-home-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["PREFECT_HOME"] = str(_home)
os.environ.pop("RLHEAL_FAULT", None)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def kill_when(proc, ready, what: str, timeout: float = 120, poll: float = 0.01) -> None:
    """SIGKILL `proc`'s process group as soon as `ready()` holds; fail if the process ends
    first or `timeout` passes (then there was nothing to interrupt)."""
    import signal
    import time

    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, f"run ended before {what}"
        time.sleep(poll)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def smoke_config(tmp_path: Path, name: str = "smoke", **override) -> Path:
    """configs/smoke.yaml with its store in tmp_path (and any top-level section replaced)."""
    import yaml

    cfg = yaml.safe_load((CONFIGS / "smoke.yaml").read_text())
    cfg.update(name=name, store=str(tmp_path / "store"), **override)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API for the session; yields its URL (for subprocesses)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture
def cli_env(prefect_api, tmp_path):
    """Environment for `rlheal` subprocesses: the session's API, offline, one thread."""
    env = dict(os.environ)
    env.update(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(_home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env
