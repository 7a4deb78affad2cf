"""flows/streaming.py: what the streaming flow asks of its Stream, on a real Prefect API."""

import shutil

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


@task
def slow_build(artifact, value: str) -> str:
    import time

    time.sleep(1.5)  # ends well after `broken` has failed
    return build.fn(artifact, value)


def test_a_failed_task_leaves_the_others_running_then_fails_where_its_stage_is_read(prefect_api, tmp_path):
    """As `make -k`: the failure of one task does not stop the tasks that do not need it
    (a resumed run has only the failed one left), and it is raised by `results` of its stage."""
    st = Store(tmp_path / "store")
    slow = st.artifact("rl", {"k": "slow"})
    seen = {}

    @flow
    def run():
        stream = Stream(Progress(tmp_path / "study", "s"), {"eval": ["x"], "rl": ["slow"]})
        stream.submit("eval", "x", broken, artifact=st.artifact("eval", {"k": "x"}))
        stream.submit("rl", "slow", slow_build, artifact=slow, value="slow")
        seen["rl"] = stream.results("rl")  # the failed evaluation does not raise here
        seen["failed"] = [(s, label) for s, label, _ in stream.failed]
        stream.results("eval")

    with pytest.raises(RuntimeError, match="stage failed"):
        run()
    assert seen == {"rl": [str(slow.path)], "failed": [("eval", "x")]}
    assert st.is_sealed(slow)


def test_a_sealed_artifacts_leftover_work_folder_is_removed_and_an_unsealed_ones_kept(tmp_path):
    """A kill between an artifact's seal and its task's clean-up leaves its work folder; the
    flow, which then does not run the task, removes it. An unsealed artifact's work folder is
    a resume point (an SFT run's last checkpoint) and stays."""
    from flows.streaming import sealed

    st = Store(tmp_path / "store")
    done, todo = st.artifact("sft", {"k": "done"}), st.artifact("sft", {"k": "todo"})
    st.build(done, lambda tmp: (tmp / "v.txt").write_text("done") and None)
    for a in (done, todo):
        a.work_dir.mkdir(parents=True)
        (a.work_dir / "checkpoint-5").write_text("resume point")
    assert sealed(done) and not done.work_dir.exists()
    assert not sealed(todo) and (todo.work_dir / "checkpoint-5").is_file()


def test_a_failed_study_clears_the_running_view(prefect_api, tmp_path, monkeypatch):
    """`rlheal status` reads what runs now from the progress file: a run that fails (here
    before any stage starts streaming) leaves nothing shown as running, not even a killed
    run's last view."""
    from flows.study import study
    from rlheal.faults import InjectedFault
    from tests.conftest import smoke_config

    cfg = smoke_config(tmp_path)
    progress = Progress(tmp_path / "store" / "studies" / "smoke", "smoke")
    progress.running({"sft": ["sft steps=[0, 4]"]})  # what a killed run left
    monkeypatch.setenv("RLHEAL_FAULT", "data")
    with pytest.raises(InjectedFault):
        study(config_path=str(cfg))
    assert progress.running_now() == {}


@pytest.mark.timeout(300)
def test_a_sealed_sft_run_missing_a_checkpoint_is_an_error_naming_it(prefect_api, smoke_study, tmp_path):
    """The flow waits for SFT's checkpoints while the run trains; a run that is sealed without
    one of them would leave it waiting for a step nothing will seal. The store does not call a
    run with a damaged part sealed (tests/faults/test_damage.py), so the state is made here
    as a run sealed without its parts recorded: an error naming the run and the step, not
    an endless wait."""
    import json

    from flows.study import study
    from rlheal.store import MANIFEST
    from tests.conftest import copy_study

    copy = copy_study(smoke_study, tmp_path)
    last = max(copy.store.glob("sft/*-s*"), key=lambda p: int(p.name.rsplit("-s", 1)[1]))
    run = copy.store / "sft" / last.name.rsplit("-s", 1)[0]
    manifest = json.loads((run / MANIFEST).read_text())
    manifest["parts"] = [p for p in manifest["parts"] if not p.endswith(last.name)]
    (run / MANIFEST).write_text(json.dumps(manifest))
    shutil.rmtree(last)
    step = int(last.name.rsplit("-s", 1)[1])
    with pytest.raises(RuntimeError, match=rf"sealed but not its checkpoints \[{step}\]: remove that folder"):
        study(config_path=str(copy.config))


STARTED, RELEASE = __import__("threading").Event(), __import__("threading").Event()


@task(task_run_name="eval base id")
def held() -> str:
    STARTED.set()
    RELEASE.wait(60)
    return "held"


@task(task_run_name="sft steps=[0, 4]")
def quick() -> str:
    return "quick"


def test_running_now_names_this_flow_runs_running_tasks_by_their_stage_tag(prefect_api):
    """What the progress line shows as running comes from the API: this flow run's task
    runs in state RUNNING, grouped by their `stage:` tag (an ended task is not running)."""
    import time

    from prefect import tags

    from flows.streaming import running_now

    @flow
    def run():
        with tags("stage:sft"):
            quick.submit().result()
        with tags("stage:eval"):
            future = held.submit()
        assert STARTED.wait(30)
        deadline, seen = time.monotonic() + 20, {}
        while time.monotonic() < deadline and not seen:  # the RUNNING state is set before the body runs
            seen = running_now()
            time.sleep(0.1)
        RELEASE.set()
        future.result()
        # the API learns the task ended a moment after its result is back here (the state is
        # reported asynchronously): wait for it, as for RUNNING above
        deadline, after = time.monotonic() + 20, running_now()
        while time.monotonic() < deadline and after:
            time.sleep(0.1)
            after = running_now()
        return seen, after

    STARTED.clear(), RELEASE.clear()
    seen, after = run()
    assert seen == {"eval": ["eval base id"]}
    assert after == {}
