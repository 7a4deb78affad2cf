"""Two `rlheal run` processes on one store and study: both finish, each artifact once."""

import pytest

from tests.conftest import assert_rebuilt
from tests.faults.conftest import assert_sealed_or_absent, copy_study, start, study_tables, write_config


@pytest.mark.parametrize("begin", [
    "thin",  # a copy of the finished study with one task of every stage left (the model, SFT and an RL checkpoint's eval among them)
    pytest.param("empty", marks=pytest.mark.integration),  # every task of every stage contended
])
def test_two_runs_at_once(tmp_path, cli_env, smoke_study, begin):
    mine = copy_study(smoke_study, tmp_path, thin=True) if begin == "thin" else None
    cfg = mine.config if mine else write_config(tmp_path)
    procs = [start(["run", str(cfg), "-v"], cli_env) for _ in range(2)]  # -v: the stages' log lines are counted
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    both = "\n".join(outs)
    assert both.count("built tiny model") == 1
    for step in (2, 4):
        assert both.count(f"sft step={step} sealed") == 1
    assert both.count("eval rl-4-2 id: accuracy") == 1  # the evaluation the thin copy lacks
    assert_sealed_or_absent(tmp_path / "store")
    ours, ref = study_tables(tmp_path / "store"), study_tables(smoke_study.store)
    for name in ref:
        assert ours[name].equals(ref[name]), name
    if mine:
        assert_rebuilt(mine, smoke_study)
