"""flows/streaming.py: what the streaming flow asks of its Stream, on a real Prefect API."""

import pytest
from prefect import flow, task

from flows.streaming import Stream
from rlheal.progress import Progress
from rlheal.store import Store

RAN: list[str] = []


@task
def build(artifact, value: str) -> str:
    RAN.append(value)
    return str(Store(artifact.root).build(artifact, lambda tmp: (tmp / "v.txt").write_text(value) and None))


@task
def broken(artifact) -> str:
    raise RuntimeError("stage failed")


def test_a_sealed_artifact_is_handed_out_without_a_task_run_and_progress_counts_each_once(prefect_api, tmp_path):
    st = Store(tmp_path / "store")
    a, b = st.artifact("eval", {"k": "a"}), st.artifact("eval", {"k": "b"})
    st.build(a, lambda tmp: (tmp / "v.txt").write_text("a") and None)  # sealed before the run
    progress = Progress(tmp_path / "study", "s")

    @flow
    def run():
        stream = Stream(progress, {"eval": ["eval a", "eval b"]})
        stream.submit("eval", "eval a", build, artifact=a, value="a")
        stream.submit("eval", "eval b", build, artifact=b, value="b")
        return stream.results("eval")

    RAN.clear()
    assert run() == sorted([str(a.path), str(b.path)])
    assert RAN == ["b"]  # a was not run again
    assert progress.summary()["eval"] == (2, 2)


def test_a_failed_task_fails_the_stream(prefect_api, tmp_path):
    st = Store(tmp_path / "store")

    @flow
    def run():
        stream = Stream(Progress(tmp_path / "study", "s"), {"eval": ["x"]})
        stream.submit("eval", "x", broken, artifact=st.artifact("eval", {"k": "x"}))
        while stream.busy:
            stream.ended()

    with pytest.raises(RuntimeError, match="stage failed"):
        run()
