"""Shared helpers of the fault suite: run the smoke study as a real `rlheal` process. The
uninterrupted yardstick is the session's `smoke_study` (tests/conftest.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from rlheal.store import MANIFEST, Store
from tests.conftest import RUN_DEPENDENT, copy_study, smoke_config as write_config  # noqa: F401 (used by the fault tests)
from tests.conftest import study_tables as every_table


def rlheal(args, env, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True, timeout=600, **kw)


def start(args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_after(proc: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL the whole process group after `seconds`; False if it had already finished."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def artifact_dirs(store: Path):
    """Every artifact directory in the store (stage/<key>), not temp or lock folders."""
    for stage in store.iterdir():
        if stage.is_dir() and not stage.name.startswith(".") and stage.name != "studies":
            yield from (d for d in stage.iterdir() if d.is_dir() and not d.name.startswith("."))


def assert_sealed_or_absent(store: Path) -> int:
    s = Store(store)
    n = 0
    for d in artifact_dirs(store):
        assert (d / MANIFEST).is_file(), f"{d} is in place without a manifest"
        assert s.problem(d) is None, f"{d}: {s.problem(d)}"
        n += 1
    return n


def study_tables(store: Path, study: str = "smoke") -> dict[str, pl.DataFrame]:
    """The study's tables without their run-dependent columns."""
    return {name: t.drop([c for c in t.columns if c in RUN_DEPENDENT]) for name, t in every_table(store, study).items()}


@pytest.fixture
def reference_store(smoke_study) -> Path:
    """The store of one uninterrupted smoke study, the yardstick of every fault test (the
    session's shared `smoke_study`: read-only)."""
    return smoke_study.store
