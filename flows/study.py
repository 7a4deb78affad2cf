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
from tasks import data, models, sft


@flow(name="rlheal-study", flow_run_name="study {config_path}", log_prints=False)
def study(config_path: str, store: str | None = None) -> dict[str, str]:
    cfg = load_config(config_path, store)
    st = open_store(cfg.store)
    cached = cached_in(st)

    def stage(name: str):
        return tags(f"study:{cfg.name}", f"stage:{name}")

    with stage("data"):
        data_dir = data.stage.with_options(**cached)(artifact=str(data.artifact(st, cfg)), cfg=cfg)
    st.publish_all(cfg.name, Path(data_dir), data.TABLES)

    with stage("model"):
        model_dir = models.stage.with_options(**cached)(artifact=str(models.artifact(st, cfg)), cfg=cfg)

    with stage("sft"):
        sft_art = sft.artifact(st, cfg, st.from_path(model_dir), st.from_path(data_dir))
        sft_dir = sft.stage.with_options(**cached)(artifact=str(sft_art), cfg=cfg, model=model_dir, data=data_dir)
    st.publish_all(cfg.name, Path(sft_dir), sft.TABLES)

    return {"data": data_dir, "model": model_dir, "sft": sft_dir}
