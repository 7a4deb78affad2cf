"""Barrier flow against streaming flow on a simulated cluster (issue 18).

    python benchmarks/bench_streaming.py [--tables store/studies/toy/tables] [--config configs/paper-llama3.2-11b.yaml] [--workers 8]

The study's task graph (the config's SFT checkpoints, its RL starts and saves, two splits,
svd, the edit variants, the report) is replayed as a discrete-event model on N identical
workers, with per-task costs measured in a finished study's tables (per SFT step, per RL
update, per evaluation: scaled by the config's step and update counts, not by its model
size). Assumptions, not measurements: decomposing one checkpoint costs one evaluation, the
svd analysis (deltas, noise controls, tables) two, an edit variant two, and RL runs overlap
SFT and each other, as Dask workers (processes) allow; the thread runner serialises RL with
SFT, a GPU thread runner serialises every GPU task.
- SFT: one task; checkpoint k is sealed after k x (seconds per SFT step);
- RL from each start: one task of (updates x seconds per update); its checkpoints are
  sealed when it ends; it needs its starting checkpoint;
- eval: one task per (checkpoint, split) of the measured mean seconds; it needs its
  checkpoint;
- svd, streaming: one decomposition per checkpoint the analysis reads (the base, every SFT
  checkpoint, R), each once it is sealed and every SFT checkpoint's OOD evaluation is in (B
  is chosen from them), then the analysis after every evaluation and decomposition; barrier:
  one task after every evaluation that decomposes them all in a row, then analyses;
- edit: one task per variant after svd (2 evaluations' cost each); report: after edit.
`barrier` runs the stages one after another (each stage's tasks in parallel); `streaming`
starts every task as soon as what it reads exists. Ready tasks start in submission order
on the first free worker (list scheduling). Printed: makespan, worker utilisation, and the
ratio.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

from rlheal.config import load_config  # noqa: E402

EDIT_VARIANTS = 6  # the small grid (measured on the toy: 6 variants + 2 baselines)
DEFAULT_GRID = 50  # about the default grid's variants (README: "~50")


@dataclass
class Task:
    name: str
    stage: str
    cost: float
    needs: list[str] = field(default_factory=list)  # events this task waits for
    emits: dict[str, float] = field(default_factory=dict)  # event -> seconds after its start


@dataclass(frozen=True)
class Costs:
    sft_step: float
    rl_update: float
    eval: float

    @classmethod
    def from_tables(cls, tables: Path) -> Costs:
        ck = pl.read_parquet(tables / "checkpoints.parquet")
        sft = ck.filter(pl.col("stage") == "sft").sort("step")
        rl = ck.filter(pl.col("stage") == "rl").sort("step").group_by("rl_start_step").last()
        ev = pl.read_parquet(tables / "eval_summary.parquet")
        return cls(
            sft_step=sft["wall_seconds"][-1] / sft["step"][-1],
            rl_update=float((rl["wall_seconds"] / rl["step"]).mean()),
            eval=float(ev["seconds"].mean()),
        )


def graph(cfg, c: Costs, barrier: bool = False) -> list[Task]:
    """The study's tasks in the order the flow submits them (`barrier`: the barrier flow's
    svd, one task)."""
    steps = [k for k in cfg.sft.save_steps if k > 0]
    tasks = [Task("sft", "sft", steps[-1] * c.sft_step, emits={f"ckpt:sft-{k}": k * c.sft_step for k in steps} | {"ckpt:base": 0.0})]
    ckpts = ["base", *(f"sft-{k}" for k in steps)]
    starts = [0, *steps] if cfg.rl.from_steps == "all" else list(cfg.rl.from_steps)
    rl_saves = [u for u in cfg.rl.save_steps if u > 0]
    for s in starts:
        start = "base" if s == 0 else f"sft-{s}"
        run = rl_saves[-1] * c.rl_update
        tasks.append(Task(f"rl from={s}", "rl", run, needs=[f"ckpt:{start}"], emits={f"ckpt:rl-{s}-{u}": run for u in rl_saves}))
        ckpts += [f"rl-{s}-{u}" for u in rl_saves]
    evals = [Task(f"eval {ck} {split}", "eval", c.eval, needs=[f"ckpt:{ck}"], emits={f"eval:{ck}:{split}": c.eval}) for ck in ckpts for split in ("id", "ood")]
    tasks += evals
    r_start = cfg.roles.rl_start if cfg.roles.rl_start is not None else steps[-1]
    decomposed = ["base", *(f"sft-{k}" for k in steps)] + ([f"rl-{r_start}-{rl_saves[-1]}"] if rl_saves and r_start in starts else [])
    every_eval = [n for t in evals for n in t.emits]
    if barrier:
        cost = (len(decomposed) + 2) * c.eval
        tasks.append(Task("svd", "svd", cost, needs=every_eval, emits={"svd": cost}))
    else:
        b_known = [f"eval:{ck}:ood" for ck in ckpts if ck.startswith("sft-")]
        parts = [Task(f"svd {ck}", "svd", c.eval, needs=[f"ckpt:{ck}", *b_known], emits={f"svd:{ck}": c.eval}) for ck in decomposed]
        tasks += parts
        tasks.append(Task("svd", "svd", 2 * c.eval, needs=every_eval + [n for t in parts for n in t.emits], emits={"svd": 2 * c.eval}))
    variants = EDIT_VARIANTS if cfg.edit.grid == "small" else DEFAULT_GRID
    edits = [Task(f"edit {i}", "edit", 2 * c.eval, needs=["svd"], emits={f"edit:{i}": 2 * c.eval}) for i in range(variants)]
    tasks += edits
    tasks.append(Task("report", "report", c.eval, needs=[n for t in edits for n in t.emits], emits={"report": c.eval}))
    return tasks


STAGES = ("sft", "rl", "eval", "svd", "edit", "report")


def simulate(tasks: list[Task], workers: int, barrier: bool) -> tuple[float, float]:
    """(makespan, utilisation) of list scheduling on `workers`; `barrier` adds, for every
    task, a wait for every task of the stages before its own."""
    for t in tasks:
        t.emits = {**t.emits, f"done:{t.name}": t.cost}
    if barrier:  # a stage starts when every task of the stages before it has ended
        ends = {s: [f"done:{t.name}" for t in tasks if t.stage == s] for s in STAGES}
        for t in tasks:
            before = STAGES[: STAGES.index(t.stage)]
            t.needs = sorted(set(t.needs) | {e for s in before for e in ends[s]})
    happened: dict[str, float] = {}
    free = [0.0] * workers  # when each worker is next free
    waiting = list(tasks)
    busy = 0.0
    future: list[tuple[float, str]] = []  # (time, event) not yet happened
    while waiting:
        ready = [t for t in waiting if all(n in happened for n in t.needs)]
        if not ready:  # advance to the next event
            when, event = heapq.heappop(future)
            happened[event] = when
            continue
        t = ready[0]
        w = min(range(workers), key=lambda i: free[i])
        start = max(free[w], max((happened[n] for n in t.needs), default=0.0))
        # events due before this start may free other tasks first: take them in time order
        if future and future[0][0] <= start:  # ties too: a worker frees as its task's events fire
            when, event = heapq.heappop(future)
            happened[event] = when
            continue
        free[w] = start + t.cost
        busy += t.cost
        for event, after in t.emits.items():
            heapq.heappush(future, (start + after, event))
        waiting.remove(t)
    while future:
        when, event = heapq.heappop(future)
        happened[event] = when
    makespan = max(max(free), max(happened.values(), default=0.0))
    return makespan, busy / (workers * makespan)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tables", type=Path, default=ROOT / "store/studies/toy/tables", help="a finished study's tables folder, whose per-task costs are replayed (default: the toy's, after `make demo`)")
    ap.add_argument("--config", type=Path, default=ROOT / "configs/paper-llama3.2-11b.yaml")
    ap.add_argument("--workers", type=int, default=8)
    args = ap.parse_args(argv)
    if not (args.tables / "checkpoints.parquet").is_file():
        ap.error(f"--tables: {args.tables} holds no finished study's tables (run `make demo` first)")
    costs = Costs.from_tables(args.tables)
    cfg = load_config(args.config)
    print(f"costs (s): SFT step {costs.sft_step:.3f}, RL update {costs.rl_update:.2f}, evaluation {costs.eval:.2f}; {args.config.name} on {args.workers} workers")
    results = {}
    for name in ("barrier", "streaming"):
        makespan, util = simulate(graph(cfg, costs, barrier=name == "barrier"), args.workers, barrier=name == "barrier")
        results[name] = makespan
        print(f"  {name:<9} makespan {makespan:9.1f} s   utilisation {100 * util:5.1f} %")
    print(f"  streaming / barrier makespan: {results['streaming'] / results['barrier']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
