"""The discrete-event model behind benchmarks/bench_streaming.py: hand-checkable schedules."""

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("bench_streaming", Path(__file__).resolve().parents[1] / "benchmarks/bench_streaming.py")
bs = sys.modules["bench_streaming"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bs)
Task = bs.Task


def chain():
    """SFT seals a checkpoint at 2 s and ends at 10 s; its evaluation takes 3 s; then svd."""
    return [
        Task("sft", "sft", 10, emits={"ckpt:a": 2, "ckpt:b": 10}),
        Task("eval a", "eval", 3, needs=["ckpt:a"], emits={"eval:a": 3}),
        Task("eval b", "eval", 3, needs=["ckpt:b"], emits={"eval:b": 3}),
        Task("svd", "svd", 1, needs=["eval:a", "eval:b"], emits={"svd": 1}),
    ]


def test_streaming_evaluates_a_checkpoint_while_sft_still_runs():
    makespan, util = bs.simulate(chain(), workers=2, barrier=False)
    assert makespan == 14  # eval a at 2-5 beside SFT, eval b at 10-13, svd 13-14
    assert abs(util - 17 / 28) < 1e-9


def test_a_barrier_waits_for_the_whole_stage():
    makespan, _ = bs.simulate(chain(), workers=2, barrier=True)
    assert makespan == 14  # both evals at 10-13 on two workers, svd 13-14
    makespan, _ = bs.simulate(chain(), workers=1, barrier=True)
    assert makespan == 17  # one worker: everything in a row
    makespan, _ = bs.simulate(chain(), workers=1, barrier=False)
    assert makespan == 17  # streaming cannot beat one worker's total work


def test_three_evaluations_on_two_workers_during_a_long_sft():
    tasks = [Task("sft", "sft", 20, emits={"ckpt:a": 1, "ckpt:b": 2, "ckpt:c": 3})]
    tasks += [Task(f"eval {c}", "eval", 4, needs=[f"ckpt:{c}"], emits={f"eval:{c}": 4}) for c in "abc"]
    assert bs.simulate([Task(**vars(t)) for t in tasks], workers=2, barrier=False)[0] == 20  # 1-5, 5-9, 9-13 beside SFT
    assert bs.simulate([Task(**vars(t)) for t in tasks], workers=2, barrier=True)[0] == 28  # 20-24 twice, 24-28


def test_a_task_freed_at_the_instant_a_worker_frees_starts_in_submission_order():
    """The review's case: t1 becomes ready exactly when t0's worker frees; list scheduling
    in submission order runs t1 there, before t3 (with `<` the model ran t3 first: 8.842)."""
    tasks = [Task("t0", "eval", 2.835), Task("t1", "eval", 4.079, needs=["done:t0"]), Task("t2", "eval", 4.762), Task("t3", "eval", 4.175)]
    makespan, _ = bs.simulate(tasks, workers=2, barrier=False)
    assert abs(makespan - 8.937) < 1e-9


def test_rl_from_all_includes_the_base_as_the_flow_does():
    from rlheal.config import parse_config

    cfg = parse_config({"name": "t", "sft": {"save_steps": [10, 20]}, "rl": {"from_steps": "all"}})
    names = [t.name for t in bs.graph(cfg, bs.Costs(1, 1, 1)) if t.stage == "rl"]
    assert names == ["rl from=0", "rl from=10", "rl from=20"]


def test_svd_decomposes_each_checkpoint_once_b_is_known_then_analyses():
    """Streaming: one decomposition per checkpoint the analysis reads (base, each SFT
    checkpoint, R), each needing every SFT OOD evaluation (B); the barrier flow's svd is one
    task of all of them in a row plus the analysis."""
    from rlheal.config import parse_config

    cfg = parse_config({"name": "t", "sft": {"save_steps": [0, 10, 20]}, "rl": {"from_steps": [10, 20], "save_steps": [0, 5]}})
    tasks = {t.name: t for t in bs.graph(cfg, bs.Costs(1, 1, 3))}
    parts = sorted(n for n in tasks if n.startswith("svd "))
    assert parts == ["svd base", "svd rl-20-5", "svd sft-10", "svd sft-20"]  # R: RL from the last SFT step
    assert set(tasks["svd sft-10"].needs) == {"ckpt:sft-10", "eval:sft-10:ood", "eval:sft-20:ood"}
    assert {f"svd:{n.removeprefix('svd ')}" for n in parts} <= set(tasks["svd"].needs)  # the analysis reads them all
    (barrier,) = [t for t in bs.graph(cfg, bs.Costs(1, 1, 3), barrier=True) if t.stage == "svd"]
    assert barrier.cost == (4 + 2) * 3
