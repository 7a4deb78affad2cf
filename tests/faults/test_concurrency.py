"""Two `rlheal run` processes on one store and study: both finish, each artifact once."""

from tests.faults.conftest import assert_sealed_or_absent, start, study_tables, write_config


def test_two_runs_at_once(tmp_path, cli_env, reference_store):
    cfg = write_config(tmp_path)
    procs = [start(["run", str(cfg)], cli_env) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    both = "\n".join(outs)
    assert both.count("built tiny model") == 1
    for step in (2, 4):
        assert both.count(f"sft step={step} sealed") == 1
    assert both.count("eval base id: accuracy") == 1
    assert_sealed_or_absent(tmp_path / "store")
    ours, ref = study_tables(tmp_path / "store"), study_tables(reference_store)
    for name in ref:
        assert ours[name].equals(ref[name]), name
