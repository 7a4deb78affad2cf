"""`kill -9` the smoke study at random moments, run it again, and compare.

`make test` kills two seeds in a thin copy of the session's finished study (one task of
every stage left to do, `copy_study(thin=True)`); `make test-integration` kills the same two
seeds from an empty store; `make faults` runs all seeds from an empty store (`-m faults`).
"""

import random
import time

import pytest
from safetensors.torch import load_file

from tests.conftest import assert_rebuilt
from tests.faults.conftest import assert_sealed_or_absent, copy_study, kill_after, rlheal, start, study_tables, write_config

FAST_SEEDS = [0, 1]
ALL_SEEDS = list(range(24))
# the smoke study takes ~40 s as a fresh process (imports ~5 s, then data, model, sft, rl,
# eval, svd, editing, report): kill times span every stage
KILL_WINDOW = (0.5, 42.0)
# a thin copy's re-run works for ~15 s on an idle 2-core machine once it has claimed the
# study (data, model, sft, rl, eval, svd, editing, report, one task each); it is timed from
# that moment, not from the process start, whose imports take 5 s idle and 50 s under load
THIN_KILL_WINDOW = (0.0, 15.0)


def kill_and_resume(seed, tmp_path, cli_env, smoke_study, thin=False):
    reference_store = smoke_study.store
    mine = copy_study(smoke_study, tmp_path, thin=True) if thin else None
    cfg = mine.config if thin else write_config(tmp_path)
    at = random.Random(seed).uniform(*(THIN_KILL_WINDOW if thin else KILL_WINDOW))
    store = tmp_path / "store"
    proc = start(["run", str(cfg)], cli_env)
    if thin:  # the copy has no study folder until the run claims the study
        claimed, deadline = store / "studies" / "smoke" / "config.json", time.time() + 600
        while not claimed.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert claimed.exists(), "the run never claimed its study"
    killed = kill_after(proc, at)
    if store.exists():
        assert_sealed_or_absent(store)
    again = rlheal(["run", str(cfg)], cli_env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert assert_sealed_or_absent(store) > 0
    ours, ref = study_tables(store), study_tables(reference_store)
    assert set(ours) == set(ref)
    ours_ckpt, ref_ckpt = ours.pop("checkpoints"), ref.pop("checkpoints")
    same_weights = set(ours_ckpt["content_hash"]) == set(ref_ckpt["content_hash"])
    if not same_weights:  # training resumed mid-run: equal within tolerance, not bit for bit
        for a, b in zip(sorted(store.glob("sft/*-s*")), sorted(reference_store.glob("sft/*-s*"))):
            wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
            for k in wb:
                assert (wa[k] - wb[k]).abs().max() < 1e-4, k
    for name, table in ref.items():
        if name.startswith("eval") and not same_weights:
            continue  # greedy outputs of near-equal weights may legitimately differ
        assert ours[name].equals(table), name
    if thin:  # what the re-runs rebuilt equals the uninterrupted run's artifact of the same key
        assert_rebuilt(mine, smoke_study, None if same_weights else ("data", "model"))  # other weights: other keys downstream
    return killed, at


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_kill_9_then_resume_fast(seed, tmp_path, cli_env, smoke_study):
    kill_and_resume(seed, tmp_path, cli_env, smoke_study, thin=True)


@pytest.mark.parametrize("seed", [pytest.param(s, marks=pytest.mark.faults if s not in FAST_SEEDS else pytest.mark.integration) for s in ALL_SEEDS])
def test_kill_9_then_resume_all(seed, tmp_path, cli_env, smoke_study):
    kill_and_resume(seed, tmp_path, cli_env, smoke_study)
