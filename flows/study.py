"""The study as one Prefect flow: data -> sft -> rl -> evaluate -> svd -> editing -> report.

Each stage is a cached task whose result is the path of a sealed store artifact;
re-running a study (from the CLI or by retrying the flow run) recomputes only what
is missing.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, tags

from rlheal.caching import cached_in, open_store
from rlheal.config import load_config
from tasks import data


@flow(name="rlheal-study", flow_run_name="study {config_path}", log_prints=True)
def study(config_path: str, store: str | None = None) -> dict[str, str]:
    cfg = load_config(config_path, store)
    st = open_store(cfg.store)
    cached = cached_in(st)

    with tags(f"study:{cfg.name}", "stage:data"):
        data_dir = data.stage.with_options(**cached)(artifact=str(data.artifact(st, cfg)), cfg=cfg)
    st.publish_all(cfg.name, Path(data_dir), data.TABLES)

    return {"data": data_dir}
