"""Shared test setup: offline, one torch thread, an isolated Prefect home, one Prefect API
server for the whole session (it takes ~15 s to start), and one finished smoke study.

Fixtures and helpers for tests of whole studies:

- `smoke_study` (session): ONE finished `rlheal run` of configs/smoke.yaml, shared by every
  test that only reads a finished study. Read-only: the session checks at its end that no
  file of it changed. Yields a `Study` (store root, config file, study name).
- `copy_study(study, dst)`: a writable copy of a finished study under `dst` (a copy of the
  ~20 MB store takes well under a second), for tests that re-run, damage or extend it.
- `copy_study(study, dst, thin=True)`: the same with one task's artifact of every stage
  removed and the study's own folder (tables, report, progress) gone, so that a re-run
  does a little real work in every stage (~1/5 of the study) instead of all of it.
- `smoke_config(tmp_path)`: configs/smoke.yaml with its store in tmp_path (a fresh study).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

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


# Columns of the study tables that depend on the run, not on what it computes.
RUN_DEPENDENT = frozenset({"path", "wall_seconds", "seconds", "device", "created_at", "evaluated_at"})


def study_tables(store: Path, study: str = "smoke") -> dict:
    """name -> DataFrame of every table a study published."""
    import polars as pl

    return {p.stem: pl.read_parquet(p) for p in sorted((store / "studies" / study / "tables").glob("*.parquet"))}


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


# ---------------------------------------------------------------- one finished smoke study


class Study(NamedTuple):
    """A study on disk: its store root, its config file (whose `store` is that root), its name."""

    store: Path
    config: Path
    name: str = "smoke"
    removed: tuple[str, ...] = ()  # a thin copy: the task artifacts removed ("stage/key")


def _fingerprint(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root (links included, not followed) with its size and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or p.is_file():
            st = p.lstat()
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def _build_smoke_study(tmp: Path, api_url: str) -> Study:
    cfg = smoke_config(tmp)
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(_home)}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(cfg)], env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return Study(tmp / "store", cfg)


@pytest.fixture(scope="session")
def smoke_study(prefect_api, tmp_path_factory, request) -> Study:
    """The smoke study, run once per session as a user runs it (`rlheal run`), uninterrupted:
    the yardstick of every resume, fault and replicate test and the input of every test that
    reads a finished study. READ-ONLY: copy it with `copy_study` to change anything. Under
    pytest-xdist the workers share one build (a file lock: the first to need it builds it,
    the others wait for it)."""
    from filelock import FileLock

    if not hasattr(request.config, "workerinput"):  # no pytest-xdist worker
        study = _build_smoke_study(tmp_path_factory.mktemp("smoke-study"), prefect_api)
    else:  # one build for all workers, in the directory they share
        shared = tmp_path_factory.getbasetemp().parent / "smoke-study"
        with FileLock(str(shared) + ".lock"):
            if not (shared / "built").is_file():
                shutil.rmtree(shared, ignore_errors=True)
                shared.mkdir()
                _build_smoke_study(shared, prefect_api)
                (shared / "built").write_text("")
        study = Study(shared / "store", shared / "smoke.yaml")
    before = _fingerprint(study.store)
    yield study
    after = _fingerprint(study.store)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into the shared smoke study (copy it with copy_study): {changed[:10]}"


def _thin(store: Path, study: str) -> tuple[str, ...]:
    """Remove one task's artifact of every stage (with the checkpoints it owns): the data, the
    tiny model, the SFT run, the RL run from the latest start, the id evaluation of that
    run's last checkpoint, the svd analysis, the first editing variant that is not a baseline;
    and the study's folder. Only artifacts with a Prefect result record are task outputs (the
    others are parts built inside a task). Returns the removed task artifacts as
    "stage/key". Their keys do not change, so a re-run rebuilds exactly these (unless a
    resumed training gives other weights, which gives its consumers other keys)."""
    records = sorted((store / ".prefect" / "results").iterdir())

    def task_artifacts(stage: str) -> list[tuple[Path, dict]]:
        out = []
        for rec in records:
            if rec.name.startswith(f"{stage}-"):
                path = store / stage / rec.name[len(stage) + 1 :]
                out.append((path, json.loads((path / "manifest.json").read_text())))
        return out

    (data, _), = task_artifacts("data")
    (model, _), = task_artifacts("model")
    (sft_run, _), = task_artifacts("sft")
    # the svd analysis (its checkpoints' decompositions are the stage's other task artifacts)
    (svd_stage, _), = [(p, m) for p, m in task_artifacts("svd") if "roles" in m]
    rl_run = max((m["start"], p) for p, m in task_artifacts("rl") if "start" in m)[1]
    # an RL checkpoint's evaluation, of the removed run: the streaming flow evaluates SFT
    # checkpoints while SFT and RL run, so only this one is still to do when eval's turn comes
    latest = max(int(m["start"].split("-")[-1]) if m["start"] != "base" else 0 for p, m in task_artifacts("rl") if "start" in m)
    rl_evals = [(m["config"]["ckpt"]["step"], p) for p, m in task_artifacts("eval") if m["config"].get("split") == "id" and str(m["config"]["ckpt"].get("ckpt_id")).startswith(f"rl-{latest}-")]
    rl_eval = max(rl_evals)[1]
    variant = min((m["variant_id"], p) for p, m in task_artifacts("edit") if not m.get("variant_id", "baseline").startswith("baseline"))[1]
    removed = [data, model, sft_run, rl_run, rl_eval, svd_stage, variant]
    for path in removed:
        for p in [path, *path.parent.glob(f"{path.name}-s*")]:  # with its checkpoints <key>-s<step>
            shutil.rmtree(p)
    shutil.rmtree(store / "studies" / study)
    return tuple(p.relative_to(store).as_posix() for p in removed)


def copy_study(study: Study, dst: Path, thin: bool = False) -> Study:
    """A writable copy of `study` in dst/store with its config in dst/<name>.yaml. Prefect's
    cache records name artifacts by absolute path: they are re-pointed at the copy, so cached
    tasks hand back the copy's artifacts. Tables inside copied artifacts still name the source's
    checkpoint files by path; the source is read-only and outlives the session's tests.
    `thin`: see `_thin`; the result's `removed` names what was removed."""
    import yaml

    store = dst / "store"
    shutil.copytree(study.store, store, symlinks=True)
    old, new = f"{study.store}/", f"{store}/"
    for rec in (store / ".prefect" / "results").iterdir():
        rec.write_text(rec.read_text().replace(old, new))
    cfg = yaml.safe_load(study.config.read_text())
    cfg["store"] = str(store)
    config = dst / study.config.name
    config.write_text(yaml.safe_dump(cfg))
    return Study(store, config, study.name, _thin(store, study.name) if thin else ())


RUN_DEPENDENT = {"path", "wall_seconds", "seconds", "device", "created_at", "evaluated_at"}  # columns that differ between runs


def assert_same_artifact(ours: Path, ref: Path) -> None:
    """Two builds of one artifact hold the same files with the same content: Parquet tables
    equal without their run-dependent columns, every other file byte for byte (its sha256)."""
    import polars as pl

    assert (ours / "manifest.json").is_file(), f"{ours} was not rebuilt"
    fa, fb = (json.loads((p / "manifest.json").read_text())["files"] for p in (ours, ref))
    assert set(fa) == set(fb), (ours, sorted(set(fa) ^ set(fb)))
    for name in fb:
        if name.endswith(".parquet"):
            a, b = pl.read_parquet(ours / name), pl.read_parquet(ref / name)
            assert a.drop([c for c in a.columns if c in RUN_DEPENDENT]).equals(b.drop([c for c in b.columns if c in RUN_DEPENDENT])), (ours, name)
        else:
            assert fa[name]["sha256"] == fb[name]["sha256"], (ours, name)


def assert_rebuilt(copy: Study, reference: Study, stages: tuple[str, ...] | None = None) -> None:
    """Every task artifact removed from the thin `copy` (of `stages`, default all), with the
    checkpoints it owns, is there again and equals `reference`'s artifact of the same key."""
    for rel in copy.removed:
        if stages is None or rel.split("/")[0] in stages:
            src = reference.store / rel
            for part in [src, *src.parent.glob(f"{src.name}-s*")]:
                assert_same_artifact(copy.store / part.relative_to(reference.store), part)


def _generalpoints():
    from tasks.benchmark import get

    return get("generalpoints")


GP = _generalpoints()  # the benchmark most tests play (tasks/benchmark.py)
