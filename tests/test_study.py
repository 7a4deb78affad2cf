"""The whole study flow on the smoke config: resume after a fault at every stage, the
report, and the same tables on a Dask cluster. The finished study every test reads is the
session's `smoke_study` (tests/conftest.py); tests that change a store work on a copy."""

import re
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.conftest import RUN_DEPENDENT, assert_rebuilt, copy_study, smoke_config, study_tables

STAGE_ORDER = ["data", "model", "sft", "rl", "eval", "svd", "edit", "report"]


def task_states(flow_state, settle: float = 120) -> dict[str, str]:
    """Task run name -> state name for the DAG subflow of a study flow run. The server records
    task runs and their states from events, after the flow has returned (seconds later on a
    busy machine): read until every run has a final state and two reads a second apart agree."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    deadline, last = time.time() + settle, None
    with get_client(sync_client=True) as client:
        parent = flow_state.state_details.flow_run_id
        while True:
            subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))
            ids = [parent, *(f.id for f in subflows)]
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids}))
            now = {r.name: r.state.name if r.state and r.state.is_final() else None for r in runs if not r.name.startswith("rlheal-stages")}
            if (now == last and None not in now.values()) or time.time() > deadline:
                return now
            last = now
            time.sleep(1)


def comparable(t: dict[str, pl.DataFrame]) -> dict[str, pl.DataFrame]:
    """Tables without their run-dependent columns (paths, timings)."""
    return {k: v.drop([c for c in v.columns if c in RUN_DEPENDENT]) for k, v in t.items()}


@pytest.fixture
def reference_run(smoke_study):
    """The store of the session's finished smoke study (read-only)."""
    return smoke_study.store


@pytest.mark.parametrize("start", [
    # a store in which every stage has one task left to do (`copy_study(thin=True)`): each
    # stage still computes after the fault that stopped it, at a fifth of the cost
    "thin",
    # an empty store: every task of every stage fails once, then computes
    pytest.param("empty", marks=pytest.mark.integration),
])
def test_fault_at_each_stage_then_resume(prefect_api, smoke_study, tmp_path, monkeypatch, start):
    """Inject a failure at each stage in turn on one store: every run fails at its stage,
    computes the stage that failed last time, and finds every earlier stage Cached; the
    tables (and, from a thin store, every artifact it rebuilt) equal the uninterrupted run's."""
    from flows.study import study

    reference_run = smoke_study.store
    thin = copy_study(smoke_study, tmp_path, thin=True) if start == "thin" else None
    cfg = str(thin.config if thin else smoke_config(tmp_path))
    for i, faulty in enumerate([*STAGE_ORDER, None]):
        if faulty:
            monkeypatch.setenv("RLHEAL_FAULT", faulty)
        else:
            monkeypatch.delenv("RLHEAL_FAULT", raising=False)
        state = study(config_path=cfg, return_state=True)
        states = task_states(state)
        assert state.is_completed() == (faulty is None), (faulty, states)
        for done in STAGE_ORDER[: max(0, i - 1)]:
            if done == "report":
                continue  # never cached: it always reads the latest tables
            # a sealed artifact is not submitted again (issue 18: the store is the cache), so an
            # earlier stage has no task run at all, or only cached ones: none computed
            names = [n for n in states if n.split()[0] == done]
            assert all(states[n] == "Cached" for n in names), (faulty, done, states)
        if faulty:
            assert any(n.split()[0] == faulty and s == "Failed" for n, s in states.items()), states
    ours, ref = comparable(study_tables(tmp_path / "store", "smoke")), comparable(study_tables(reference_run, "smoke"))
    assert set(ours) == set(ref)
    for name in ref:
        assert ours[name].equals(ref[name]), name
    if thin:
        assert_rebuilt(thin, smoke_study)  # what the resumed runs computed


def test_report_from_the_smoke_study(reference_run):
    report = reference_run / "studies" / "smoke" / "report"
    md = (report / "report.md").read_text()
    pngs = list(report.glob("*.png"))
    assert len(pngs) >= 3 and all(p.stat().st_size > 5000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert "data:image/png;base64," in (report / "report.html").read_text()
    # every accuracy printed in the table is the Parquet value
    summary = pl.read_parquet(reference_run / "studies" / "smoke" / "tables" / "eval_summary.parquet")
    for r in summary.filter(pl.col("stage") != "rl").iter_rows(named=True):
        line = next(l for l in md.splitlines() if l.startswith(f"| {r['ckpt_id']} | {r['step']} | {r['split']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert (int(cells[3]), int(cells[4])) == (r["n"], r["k"])
        assert float(cells[5]) == pytest.approx(r["accuracy"], abs=5e-5)
        assert float(cells[7]) == pytest.approx(r["accuracy_ci_high"], abs=5e-5)
    assert "## Verdicts" in md and "RL recovery" in md
    # the RL recovery table: OOD after RL equals the last RL checkpoint's Parquet accuracy
    rl_rows = summary.filter((pl.col("stage") == "rl") & (pl.col("split") == "ood") & (pl.col("step") == pl.col("step").max()))
    section = md.split("## RL recovery")[1].split("##")[0]
    for r in rl_rows.iter_rows(named=True):
        assert f"{r['accuracy']:.4f}" in section


def test_report_of_a_study_missing_stages_says_what_is_absent(reference_run, tmp_path):
    from tasks import report

    study = tmp_path / "partial"
    (study / "tables").mkdir(parents=True)
    for name in ("sft_train", "sft_log", "checkpoints"):
        shutil.copy(reference_run / "studies" / "smoke" / "tables" / f"{name}.parquet", study / "tables")
    out = report.run(study / "tables", study / "report", "partial", "generalpoints")
    md = (out / "report.md").read_text()
    assert md.count("*Absent: the tables it needs are not in this study yet.*") >= 5
    assert (out / "fig3_losses.png").exists() and "no evaluation results" in md


def test_status_reads_progress_from_the_store(smoke_study):
    import subprocess
    import sys

    cfg = smoke_study.config
    r = subprocess.run([sys.executable, "-m", "flows.cli", "status", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    counts = dict(re.findall(r"^\s+(\w+)\s+#*\s+(\d+/\d+)$", r.stdout, re.M))
    assert set(counts) == set(STAGE_ORDER)
    assert counts["eval"] == "18/18" and counts["rl"] == "3/3"  # 3 SFT + 6 RL checkpoints, 2 splits
    assert all(a == b for a, b in (c.split("/") for c in counts.values()))


def test_changed_config_mid_study_is_refused(smoke_study, tmp_path):
    import subprocess
    import sys

    mine = copy_study(smoke_study, tmp_path / "copy")  # a refusal that failed would write into it
    cfg = yaml.safe_load(mine.config.read_text())
    cfg["sft"]["learning_rate"] = 0.5
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    before = sorted(p.name for p in (mine.store / "sft").iterdir())
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(changed)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "sft.learning_rate: 0.001 -> 0.5" in r.stderr
    assert sorted(p.name for p in (mine.store / "sft").iterdir()) == before


@pytest.mark.integration
def test_dask_local_cluster_gives_identical_tables(prefect_api, reference_run, tmp_path):
    from flows.study import study

    cfg = smoke_config(tmp_path, runner={"kind": "dask", "n_workers": 2, "threads_per_worker": 1})
    state = study(config_path=str(cfg), return_state=True)
    assert state.is_completed()
    ours, ref = comparable(study_tables(tmp_path / "store", "smoke")), comparable(study_tables(reference_run, "smoke"))
    assert set(ours) == set(ref)
    for name in ref:
        assert ours[name].equals(ref[name]), name


@pytest.mark.integration
def test_a_seed_replicate_shares_the_store_and_compares(prefect_api, smoke_study, tmp_path):
    """A second study made with --set overrides reuses the data-independent artifacts, and
    `rlheal compare` judges both with the report's own verdicts."""
    import subprocess
    import sys

    from flows.study import study

    store = copy_study(smoke_study, tmp_path).store  # the replicate joins a copy of the finished study
    models_before = sorted(p.name for p in (store / "model").iterdir())
    cfg = str(tmp_path / "smoke.yaml")
    state = study(config_path=cfg, overrides=["name=smoke-seed1", "data.train_seed=1", "rl.seed=1"], return_state=True)
    assert state.is_completed()
    assert sorted(p.name for p in (store / "model").iterdir()) == models_before  # built once
    seed1 = study_tables(store, "smoke-seed1")
    assert not seed1["sft_train"].equals(study_tables(store, "smoke")["sft_train"])  # another hand stream

    r = subprocess.run([sys.executable, "-m", "flows.cli", "compare", "smoke", "smoke-seed1", "--store", str(store)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = store / "replicates" / "smoke+smoke-seed1"
    long = pl.read_parquet(out / "replicates.parquet")
    assert set(long["study"]) == {"smoke", "smoke-seed1"} and set(long["finding"]) == {"forgetting", "loss", "window", "rotation", "edit_some", "edit_most", "monitor"}
    md = (out / "replicates.md").read_text()
    for name in ("smoke", "smoke-seed1"):
        # each study's verdicts are exactly those of its own report
        own = re.findall(r"\| \*\*([a-z ]+)\*\* \|$", (store / "studies" / name / "report" / "report.md").read_text(), re.M)
        got = long.filter(pl.col("study") == name).unique("finding", keep="first", maintain_order=True)["verdict"].to_list()
        assert own == got, (name, own, got)
    assert "## Verdicts" in md and (out / "fig_replicates.png").read_bytes()[:4] == b"\x89PNG"
    assert (long.filter(pl.col("metric") == "ood_peak")["value"].is_between(0, 1)).all()

    one = subprocess.run([sys.executable, "-m", "flows.cli", "compare", "smoke", "--store", str(store)], capture_output=True, text=True, timeout=60)
    assert one.returncode == 2 and "at least two" in one.stderr
    missing = subprocess.run([sys.executable, "-m", "flows.cli", "compare", "smoke", "nosuch", "--store", str(store)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "studies/nosuch: no study tables" in missing.stderr
    assert not (store / "replicates" / "smoke+nosuch").exists()


def test_the_flow_streams_evaluations_start_while_sft_trains(smoke_study):
    """Issue 18: the base's evaluations start as soon as SFT is submitted and each SFT
    checkpoint's as soon as it is sealed, not after the whole SFT stage and every RL run
    (the barrier flow started the first evaluation after the last RL run had ended)."""
    import json
    from datetime import datetime

    def manifests(stage):
        for m in sorted((smoke_study.store / stage).glob("*/manifest.json")):
            yield json.loads(m.read_text())

    def span(m):
        end = datetime.fromisoformat(m["created_at"]).timestamp()
        return end - m["build_seconds"], end

    assert len([m for m in manifests("sft") if "parts" in m]) == 1
    rl_starts = [span(m)[0] for m in manifests("rl") if m.get("algorithm")]
    evals = {(m["config"]["ckpt"]["ckpt_id"], m["config"]["split"]): span(m) for m in manifests("eval") if "ckpt" in m.get("config", {})}
    assert len(evals) == 18 and len(rl_starts) == 3
    # every SFT checkpoint's evaluations were submitted before any RL run (the thread runner
    # runs RL after SFT): the first ones ended before the first RL run started
    sft_evals = [v for (ckpt, _), v in evals.items() if not ckpt.startswith("rl-")]
    assert min(end for _, end in sft_evals) < min(rl_starts), (sorted(sft_evals), sorted(rl_starts))
    # the checkpoints the svd analysis reads were decomposed before it (by their own tasks,
    # once the SFT checkpoints' OOD accuracies were in), each once: one cache artifact per
    # checkpoint, holding the columns the analysis and editing read (§4.5 rule 1)
    cache = [m for m in manifests("svd") if m.get("config", {}).get("kind") == "svd_cache"]
    weights = [m["config"]["object"]["content_hash"] for m in cache if m["config"]["object"]["kind"] == "weight"]
    assert len(weights) == len(set(weights)) == 1 + 2 + 1  # base, 2 SFT checkpoints, R
    (analysis,) = [m for m in manifests("svd") if "roles" in m]
    decomposed = max(span(m)[1] for m in cache if m["config"]["object"]["kind"] == "weight")
    assert decomposed < span(analysis)[0]  # not inside the analysis, as the barrier flow did
