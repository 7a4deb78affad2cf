"""Resume through the store-backed cache policy, on a real Prefect API."""

import os
from pathlib import Path

from prefect import flow, task

from rlheal.caching import Stage, cached_in, open_store
from rlheal.store import Artifact, write_parquet
import polars as pl


def count(log: Path, name: str) -> int:
    return log.read_text().split().count(name) if log.exists() else 0


FIRST, SECOND = Stage("first", version="1"), Stage("second", version="1")


@task
def first(artifact: Artifact, log: str) -> str:
    with open(log, "a") as f:
        f.write("first\n")
    return str(FIRST.build(artifact, lambda tmp: write_parquet(pl.DataFrame({"x": [1, 2]}), tmp / "x.parquet")))


@task
def second(artifact: Artifact, upstream: str, log: str) -> str:
    with open(log, "a") as f:
        f.write("second\n")
    if os.environ.get("RESUME_TEST_FAIL") == "1":
        raise RuntimeError("injected")
    x = pl.read_parquet(Path(upstream) / "x.parquet")
    return str(SECOND.build(artifact, lambda tmp: write_parquet(x * 10, tmp / "y.parquet")))


@flow
def two_stages(root: str, log: str):
    """Two stages on the stage contract: the flow derives each key once and hands the
    artifact over; the cache policy keys the task run by it."""
    st = open_store(root)
    a = FIRST.artifact(st, {"n": 2})
    b = SECOND.artifact(st, {"scale": 10}, inputs=[a])
    s1 = first.with_options(**cached_in(st))(artifact=a, log=log, return_state=True)
    s2 = second.with_options(**cached_in(st))(artifact=b, upstream=s1.result(), log=log, return_state=True)
    return s1, s2


def test_failed_flow_resumes_from_cache(prefect_api, tmp_path, monkeypatch):
    root, log = str(tmp_path / "store"), tmp_path / "log.txt"

    monkeypatch.setenv("RESUME_TEST_FAIL", "1")
    s1, s2 = two_stages(root, str(log))
    assert s1.is_completed() and s2.is_failed()
    assert (count(log, "first"), count(log, "second")) == (1, 1)

    monkeypatch.setenv("RESUME_TEST_FAIL", "0")
    s1, s2 = two_stages(root, str(log))
    assert s1.name == "Cached" and s2.is_completed()
    assert (count(log, "first"), count(log, "second")) == (1, 2)
    assert pl.read_parquet(Path(s2.result()) / "y.parquet")["x"].to_list() == [10, 20]

    # a third run executes nothing
    s1, s2 = two_stages(root, str(log))
    assert (s1.name, s2.name) == ("Cached", "Cached")
    assert (count(log, "first"), count(log, "second")) == (1, 2)


def test_missing_artifact_is_recomputed_not_served_from_cache(prefect_api, tmp_path):
    import shutil

    root, log = str(tmp_path / "store"), tmp_path / "log.txt"
    s1, _ = two_stages(root, str(log))
    shutil.rmtree(s1.result())
    s1, s2 = two_stages(root, str(log))
    assert s1.name != "Cached" and Path(s1.result()).exists()
    assert count(log, "first") == 2
    assert s2.name == "Cached"  # its own artifact is intact
