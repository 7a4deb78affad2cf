"""Orchestration overhead and resume cost of the study flow.

    python benchmarks/bench_orchestration.py [--config configs/smoke.yaml]

1. The study through Prefect (`rlheal run` against a running API server) versus calling
   the same stage functions directly, each in a fresh process on a fresh store.
2. A second run of the completed study versus the first (resume cost; goal < 5 %).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import polars as pl  # noqa: E402

from rlheal.config import load_config  # noqa: E402
from rlheal.store import Store  # noqa: E402
from tasks import data, eval, model, report, sft  # noqa: E402


def direct(config: Path, store: Path) -> float:
    """The same stages as plain function calls, no Prefect."""
    t0 = time.perf_counter()
    cfg = load_config(config, store)
    st = Store(cfg.store)
    data_dir = data.run(st, cfg)
    model_dir = model.run(st, cfg)
    sft_dir = sft.run(st, cfg, model_dir, data_dir)
    ckpts = pl.read_parquet(Path(sft_dir) / "checkpoints.parquet").to_dicts()
    paths = [eval.run(st, cfg, c, s, data_dir) for c in ckpts for s in ("id", "ood")]
    attempts, summary = eval.collect(paths)
    tables = st.tables_dir(cfg.name)
    tables.mkdir(parents=True, exist_ok=True)
    for name, table in (("eval_summary", summary), ("eval_attempts", attempts)):
        table.write_parquet(tables / f"{name}.parquet")
    report.run(tables, st.report_dir(cfg.name), cfg.name, cfg.task)
    return time.perf_counter() - t0


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).parents[1] / "configs" / "smoke.yaml"))
    args = ap.parse_args(argv)
    bindir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        port = 4300 + os.getpid() % 500
        env = {**os.environ, "PREFECT_HOME": str(tmp / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
        server = subprocess.Popen([str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        try:
            for _ in range(240):
                try:
                    urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.5)
            # every variant is a fresh process: imports cost the same in each
            run = [str(bindir / "rlheal"), "run", args.config, "--store"]
            t_direct = timed([sys.executable, __file__, "--direct", args.config, str(tmp / "direct")], env)
            t_first = timed([*run, str(tmp / "prefect")], env)
            t_second = timed([*run, str(tmp / "prefect")], env)
        finally:
            server.terminate()
            server.wait(30)
    print(f"study {Path(args.config).name}: direct stage calls {t_direct:.2f} s, Prefect flow {t_first:.2f} s (fresh processes, API server already up)")
    print(f"  orchestration overhead: x{t_first / t_direct:.2f} ({t_first - t_direct:+.2f} s)")
    print(f"  resume of the completed study: {t_second:.2f} s = {100 * t_second / t_first:.1f} % of the first run")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--direct":
        direct(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
