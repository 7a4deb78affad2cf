"""Choose RL settings on in-distribution criteria alone (docs/toy-rl.md).

    python -m tasks.rl.search configs/toy.yaml configs/search/toy-rl.yaml [--only NAME ...] [--doc docs/toy-rl.md]

Each candidate (a named override of the study's `rl` section) runs RL through the `rl`
stage itself (`tasks.rl.run`, cached and resumable in the study's store) from one SFT
checkpoint, and is scored on held-out ID hands: `deal("id", seed, i)` with every evaluation
hand skipped, evaluated with the study's evaluation protocol before and after RL. No OOD
hand is played and no OOD result is read (the evaluation hands, OOD included, are dealt
only to be skipped): nothing OOD can steer the choice. One Parquet row per candidate under `<store>/rl-search/<search>/`
(written atomically when the candidate is done, so a kill loses only the one in flight);
`--doc` rewrites the record table of docs/toy-rl.md from them.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from rlheal.config import ConfigError, StudyConfig, load_config, parse_config
from rlheal.store import Store, write_parquet
from tasks.rl.common import reward_fifths

log = logging.getLogger("rlheal.rl.search")

# docs/toy-rl.md "The criteria": fixed before the first candidate ran.
FORMAT_SLACK = 0.05  # first-attempt format-error rate may rise by at most this
EPS = 1e-9  # rates are ratios of hand counts: an exact 5- or 2-point difference must not fail by rounding
KL_RANGE = (1e-4, 0.1)  # median approx_kl: below, no movement; above, the clip no longer bounds the step
TIE = 0.02  # accuracy gains within this of the best are ties
DOC_MARKERS = ("<!-- rl-search table -->", "<!-- /rl-search table -->")
VERSION = "3"  # 2: selection hands also skip the SFT and RL training hands; 3: warm-up updates out of the KL median


# ---------------------------------------------------------------------------- selection hands


def selection_table(cfg: StudyConfig, seed: int, size: int, rl_hands: int) -> pl.DataFrame:
    """The first `size` hands of `deal("id", seed, i)` that no stage plays: not evaluation
    hands, not SFT training hands (the first data.train_size of the SFT stream), and not
    among the first `rl_hands` hands of the RL stream (a bound on what any candidate's
    rollouts dealt: one hand per generation at most). Returned as an evaluation table of
    split `id` with its own set hash (it is not the evaluation set)."""
    from tasks import benchmark
    from tasks.data import eval_table
    from tasks.rl.common import evaluation_keys

    bench = benchmark.of(cfg)

    used = {"data.eval_seed": cfg.data.eval_seed, "data.train_seed": cfg.data.train_seed, "rl.seed": cfg.rl.seed}
    for name, other in used.items():
        if seed == other:
            raise ConfigError(f"selection.seed: {seed} is {name}; the selection hands need a seed no stage deals from")
    evaluation = evaluation_keys(cfg)
    played = set(evaluation)
    for stream_seed, n in ((cfg.data.train_seed, cfg.data.train_size), (cfg.rl.seed, rl_hands)):
        stream = benchmark.training_stream(bench, stream_seed, evaluation, cfg.data.overlap)
        played |= {bench.overlap_key(h, cfg.data.overlap) for h in itertools.islice(stream, n)}
    hands = list(itertools.islice(benchmark.training_stream(bench, seed, played, cfg.data.overlap), size))
    return eval_table(bench, hands, f"selection-{seed}-{size}-{rl_hands}", cfg)


def id_score(path: str | Path, cfg: StudyConfig, table: pl.DataFrame, ckpt_id: str) -> dict[str, Any]:
    """Held-out ID accuracy (Wilson 95 %) and first-attempt format-error rate of a checkpoint."""
    import torch

    from tasks import eval, lm

    quiet = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"ce_hands": 0})})  # accuracy only
    model = lm.load_model(path, torch.float32, "cpu", cfg.model.trust_remote_code)
    tok = lm.load_tokenizer(path, cfg.model.trust_remote_code)
    _, summary = eval.evaluate_model(model, tok, table, quiet, {"ckpt_id": ckpt_id})
    row = summary.row(0, named=True)
    return {
        "n": row["n"],
        "accuracy": row["accuracy"],
        "accuracy_ci_low": row["accuracy_ci_low"],
        "accuracy_ci_high": row["accuracy_ci_high"],
        "format_error": row["first_attempt_format_error_rate"],
    }


# ---------------------------------------------------------------------------- the criteria


def criteria(rl_log: pl.DataFrame, before: dict, after: dict, warmup: int = 0) -> dict[str, Any]:
    """docs/toy-rl.md criterion 1 (stable) and the numbers of 2 and 3, from one run's
    rl_log and its held-out ID scores before and after RL. The first `warmup` updates
    (value head only: no policy is trained) do not enter the KL and clip statistics."""
    rows = rl_log.sort("update")
    policy_rows = rows.filter(pl.col("update") > warmup)
    first, last = reward_fifths(rows)
    kl = policy_rows["approx_kl"].drop_nulls().median()
    ev = rows["explained_variance"].drop_nulls()
    format_ok = after["format_error"] <= before["format_error"] + FORMAT_SLACK + EPS
    reward_ok = last >= first
    # Amendment 2026-12-02 (docs/toy-rl.md): TRL's GRPO with beta 0 logs no KL, so the KL
    # test does not apply to it; a PPO run without KL fails it.
    no_kl = kl is None and set(rows["algorithm"]) == {"grpo"}
    kl_ok = no_kl or (kl is not None and KL_RANGE[0] <= kl <= KL_RANGE[1])
    return {
        "gain": after["accuracy"] - before["accuracy"],
        "reward_first_fifth": first,
        "reward_last_fifth": last,
        "median_approx_kl": kl,
        "mean_clip_fraction": policy_rows["clip_fraction"].drop_nulls().mean(),
        "final_explained_variance": ev[-1] if len(ev) else None,
        "format_ok": format_ok,
        "reward_ok": reward_ok,
        "kl_ok": kl_ok,
        "stable": format_ok and reward_ok and kl_ok,
    }


def choose(table: pl.DataFrame) -> str | None:
    """Criterion 2: the stable candidate with the largest gain; gains within TIE of the best
    are ties, broken by lower cost, then by the larger final explained variance."""
    stable = table.filter(pl.col("stable"))
    if stable.is_empty():
        return None
    best = stable["gain"].max()
    ties = stable.filter(pl.col("gain") >= best - TIE - EPS).with_columns(ev=pl.col("final_explained_variance").fill_null(-math.inf))
    return ties.sort(["generations", "ev"], descending=[False, True])["candidate"][0]


# ---------------------------------------------------------------------------- runs


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def candidate_config(base: StudyConfig, rl_override: dict, start_step: int, name: str) -> StudyConfig:
    raw = base.model_dump(mode="json")
    raw["rl"] = merge(raw["rl"], rl_override)
    raw["rl"]["from_steps"] = [start_step]
    return parse_config(raw, f"candidate {name!r}")


def generations(cfg: StudyConfig) -> int:
    """Rollouts the run generates in all (the cost of criterion 2's tie-break)."""
    rl = cfg.rl
    per_update = rl.ppo.num_envs * rl.ppo.steps_per_env if rl.algorithm == "ppo" else rl.grpo.per_device_batch_size * rl.grpo.gradient_accumulation_steps
    return per_update * rl.num_updates


def sft_start(store: Store, cfg: StudyConfig, step: int) -> tuple[dict, Path]:
    """The study's SFT checkpoint at `step` and its data directory, through the stages
    themselves (cached in the store; no evaluation is run)."""
    from tasks import data, model, pretrain, sft

    data_dir = data.run(store, cfg)
    model_dir = model.run(store, cfg)
    if cfg.pretrain.enabled:
        model_dir = pretrain.run(store, cfg, model_dir)
    run_dir = sft.run(store, cfg, model_dir, data_dir)
    rows = pl.read_parquet(Path(run_dir) / "checkpoints.parquet").filter(pl.col("step") == step).to_dicts()
    if not rows:
        raise ConfigError(f"start_step: {step} is not in sft.save_steps {cfg.sft.save_steps}")
    return rows[0], Path(data_dir)


def run_candidate(store: Store, base: StudyConfig, search: dict, candidate: dict, out_dir: Path) -> dict:
    from tasks import rl

    name, step = candidate["name"], search["start_step"]
    cfg = candidate_config(base, candidate.get("rl", {}), step, name)
    start, data_dir = sft_start(store, cfg, step)
    table = selection_table(cfg, search["selection"]["seed"], search["selection"]["size"], rl_bound(base, search))
    run_dir = Path(rl.run(store, cfg, start, data_dir))
    ckpts = pl.read_parquet(run_dir / "checkpoints.parquet").sort("step")
    rl_log = pl.read_parquet(run_dir / "rl_log.parquet")
    before = id_score(start["path"], cfg, table, start["ckpt_id"])
    after = id_score(ckpts["path"][-1], cfg, table, ckpts["ckpt_id"][-1])
    row = {
        "candidate": name,
        "algorithm": cfg.rl.algorithm,
        "start_step": step,
        "updates": cfg.rl.num_updates,
        "generations": generations(cfg),
        "override": yaml.safe_dump(candidate.get("rl", {}), default_flow_style=True, sort_keys=True).strip(),
        "selection_hands": before["n"],
        **{f"before_{k}": v for k, v in before.items() if k != "n"},
        **{f"after_{k}": v for k, v in after.items() if k != "n"},
        **criteria(rl_log, before, after, cfg.rl.ppo.value_warmup_updates if cfg.rl.algorithm == "ppo" else 0),
        "wall_seconds": float(rl_log["wall_seconds"].max()),
        "rl_run": str(run_dir),
    }
    write_parquet(pl.DataFrame([row]), row_path(out_dir, base, search, candidate))
    return row


def rl_bound(base: StudyConfig, search: dict) -> int:
    """The most generations of any candidate: no rollout dealt a hand beyond this one."""
    return max(generations(candidate_config(base, c.get("rl", {}), search["start_step"], c["name"])) for c in search["candidates"])


def row_path(out_dir: Path, base: StudyConfig, search: dict, candidate: dict) -> Path:
    """`<name>-<hash>.parquet`, the hash over everything the row depends on: a changed
    candidate, start, selection or base study is a new row, never a stale one reused."""
    from rlheal.store import stable_hash

    cfg = candidate_config(base, candidate.get("rl", {}), search["start_step"], candidate["name"])
    what = {"study": cfg.model_dump(mode="json", exclude={"name", "store"}), "selection": search["selection"], "rl_bound": rl_bound(base, search), "version": VERSION}
    return out_dir / f"{candidate['name']}-{stable_hash(what)[:12]}.parquet"


def collect(files: list[Path]) -> pl.DataFrame:
    """The rows of these candidates (a file of an older protocol or candidate is not one)."""
    files = [f for f in files if f.is_file()]
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed") if files else pl.DataFrame()


def markdown(table: pl.DataFrame, chosen: str | None) -> str:
    if table.is_empty():
        return "(no candidate has run yet)"
    head = "| candidate | alg | start | updates × gen | ID acc before → after (95 % CI) | gain | format err before → after | reward 1st → last fifth | median KL | clip frac | final EV | stable | wall |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in table.sort("candidate").to_dicts():
        per_update = r["generations"] // max(1, r["updates"])
        flags = "yes" if r["stable"] else "no (" + ", ".join(k for k in ("format", "reward", "kl") if not r[f"{k}_ok"]) + ")"
        mark = " **(chosen)**" if r["candidate"] == chosen else ""
        lines.append(
            f"| {r['candidate']}{mark} | {r['algorithm']} | {r['start_step']} | {r['updates']} × {per_update} "
            f"| {r['before_accuracy']:.3f} → {r['after_accuracy']:.3f} ({r['after_accuracy_ci_low']:.3f}–{r['after_accuracy_ci_high']:.3f}) "
            f"| {r['gain']:+.3f} | {r['before_format_error']:.3f} → {r['after_format_error']:.3f} "
            f"| {r['reward_first_fifth']:+.2f} → {r['reward_last_fifth']:+.2f} | {_num(r['median_approx_kl'])} | {_num(r['mean_clip_fraction'])} "
            f"| {_num(r['final_explained_variance'])} | {flags} | {r['wall_seconds'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}"


def write_doc(doc: Path, table: pl.DataFrame) -> None:
    text = doc.read_text(encoding="utf-8")
    start, end = DOC_MARKERS
    if start not in text or end not in text:
        raise ConfigError(f"{doc}: has no {start} ... {end} block to rewrite")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    body = markdown(table, choose(table) if not table.is_empty() else None)
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(f"{head}{start}\n{body}\n{end}{tail}", encoding="utf-8")
    os.replace(tmp, doc)  # a kill mid-write leaves the old file


def load_search(path: Path) -> dict:
    try:
        search = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the search file ({err})") from None
    for key in ("name", "start_step", "selection", "candidates"):
        if key not in (search or {}):
            raise ConfigError(f"{path}: missing field {key!r}")
    sel = search["selection"]
    for key in ("seed", "size"):
        if not isinstance(sel, dict) or not isinstance(sel.get(key), int) or isinstance(sel.get(key), bool) or sel[key] < (1 if key == "size" else 0):
            raise ConfigError(f"{path}: selection.{key}: expected an integer {'>= 1' if key == 'size' else '>= 0'}, got {sel.get(key) if isinstance(sel, dict) else sel!r}")
    if not isinstance(search["start_step"], int) or isinstance(search["start_step"], bool):
        raise ConfigError(f"{path}: start_step: expected an SFT step (integer), got {search['start_step']!r}")
    if not isinstance(search["candidates"], list) or not all(isinstance(c, dict) and isinstance(c.get("rl", {}), dict) for c in search["candidates"]):
        raise ConfigError(f"{path}: candidates: expected a list of mappings {{name, rl: {{...}}}}")
    for c in search["candidates"]:
        if "seed" in c.get("rl", {}):  # the RL hand stream is the one the selection hands avoid
            raise ConfigError(f"{path}: candidates[{c.get('name')!r}].rl.seed: a candidate may not change the RL hand stream")
    names = [c.get("name") for c in search["candidates"]]
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{path}: candidates: every candidate needs a unique name, got {names}")
    return search


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.rl.search", description=__doc__.splitlines()[0])
    ap.add_argument("config", help="the study config whose SFT run the candidates start from")
    ap.add_argument("search", help="the search file: name, start_step, selection {seed, size}, candidates")
    ap.add_argument("--only", nargs="*", default=None, help="run these candidates only (e.g. one per process)")
    ap.add_argument("--store", default=None, help="artifact store directory (overrides the config's `store`)")
    ap.add_argument("--doc", type=Path, default=None, help="rewrite this file's record table (docs/toy-rl.md)")
    args = ap.parse_args(argv)
    # force: an imported library may have configured the root logger already, hiding rl's progress lines
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True)
    try:
        base = load_config(args.config, store=args.store)
        search = load_search(Path(args.search))
        if search["start_step"] not in base.sft.save_steps:
            raise ConfigError(f"{args.search}: start_step: {search['start_step']} is not in sft.save_steps {base.sft.save_steps}")
        for c in search["candidates"]:  # every candidate validated before the first one runs
            candidate_config(base, c.get("rl", {}), search["start_step"], c["name"])
        selection_table(base, search["selection"]["seed"], 1, 0)  # the seed check, before any stage runs
    except ConfigError as err:
        print(f"rlheal: error: {err}", file=sys.stderr)
        return 2
    from rlheal.caching import open_store

    store = open_store(base.store)
    out_dir = Path(base.store) / "rl-search" / search["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for c in search["candidates"]:
        if args.only is not None and c["name"] not in args.only:
            continue
        if row_path(out_dir, base, search, c).is_file():
            log.info("candidate %s: done before", c["name"])
            continue
        row = run_candidate(store, base, search, c, out_dir)
        log.info("candidate %s: ID accuracy %.3f -> %.3f, stable %s", c["name"], row["before_accuracy"], row["after_accuracy"], row["stable"])
    table = collect([row_path(out_dir, base, search, c) for c in search["candidates"]])
    if args.doc is not None:
        write_doc(args.doc, table)
    if not table.is_empty():
        print(markdown(table, choose(table)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
