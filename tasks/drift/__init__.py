"""Stage `drift`: the label-free forgetting monitor (issue 19, docs/monitor.md).

Per checkpoint (every SFT and RL checkpoint but the base), one artifact `<store>/drift/<key>/`
with `drift_by_checkpoint` rows: its drift from the base and from the checkpoint before it
(`reference` base | previous), per split, on the first `drift.prompts` prompts of the
evaluation sets. No answer of the evaluation set is read: the sequence-level KL
teacher-forces the base's own greedy answer, which one shared artifact holds (built by the
first task that needs it, under the store's lock). `selection` then applies the stopping rule
and the loss rules to the study's tables (`drift_selection`), and `correlations` gives every
signal's Spearman ρ with OOD accuracy (`drift_correlations`).

The math is in `signals` (tensors in, numbers out) and `states` (what a model is read for);
`monitor` holds the rule.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import polars as pl
import torch
from prefect import task

from rlheal.caching import Stage, open_store
from rlheal.config import StudyConfig
from rlheal.faults import maybe_fail
from rlheal.runners import gpu_lease
from rlheal.store import Artifact, Store, write_parquet
from tasks.drift import hidden, monitor, signals, states
from tasks.lm import ModelGenerator, load_model, load_tokenizer

STAGE = Stage("drift", version="2", tables=("drift_by_checkpoint", "drift_selection", "drift_correlations", "hidden_pair_metrics", "hidden_recovery"))  # 2: a checkpoint whose previous is the base no longer counts its prompts twice
log = logging.getLogger("rlheal.drift")
SPLITS = ("id", "ood")
ANSWERS = "drift_answers.parquet"

F64, I32, STR = pl.Float64, pl.Int32, pl.String
SCHEMA = {
    "ckpt_id": STR, "stage": STR, "step": I32, "rl_start_step": I32, "split": STR,
    "reference": STR, "ref_id": STR, "n_prompts": I32,
    "kl_forward": F64, "kl_reverse": F64, "js": F64, "sequence_kl": F64,
    **{f"jaccard_top{k}": F64 for k in signals.JACCARD_KS},
    "entropy": F64, "entropy_ref": F64, "margin": F64, "margin_ref": F64,
    "cosine_mean": F64, "cosine_p10": F64, "cosine_p50": F64, "cosine_p90": F64,
    "cosine_distance": F64, "cka": F64, "mmd2": F64,
}  # fmt: skip


# ---------------------------------------------------------------- the prompts and the base's answers


def prompts(data_path: Path, cfg: StudyConfig) -> dict[str, list[str]]:
    """The first `drift.prompts` prompts of each evaluation set (all by default)."""
    out = {}
    for split in SPLITS:
        table = pl.read_parquet(Path(data_path) / f"eval_set_{split}.parquet", columns=["prompt"])
        out[split] = table["prompt"].head(cfg.drift.prompts or table.height).to_list()
    return out


def answer_rows(model, tok, cfg: StudyConfig, data_path: Path) -> pl.DataFrame:
    """`split`, `index`, `ids` (prompt + the model's greedy answer, up to and including its
    stop token), `n_prompt` of the drift prompts (`prompts`), rendered as evaluation does."""
    greedy = {"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": cfg.eval.decoding.resolved()["max_new_tokens"]}
    gen = ModelGenerator(model, tok, greedy, cfg.chat.date_string)
    rows = []
    for split, texts in prompts(data_path, cfg).items():
        ids = [gen.prompt_ids([{"role": "user", "content": t}]) for t in texts]
        answers = [a for start in range(0, len(ids), cfg.drift.batch_size) for a in gen.answer_ids(ids[start : start + cfg.drift.batch_size])]
        rows += [{"split": split, "index": i, "ids": p + a, "n_prompt": len(p)} for i, (p, a) in enumerate(zip(ids, answers))]
    return pl.DataFrame(rows, schema={"split": STR, "index": I32, "ids": pl.List(pl.Int64), "n_prompt": I32})


def answers_key(cfg: StudyConfig, base: dict, data_path: Path) -> dict:
    return {"kind": "base_answers", "task": cfg.task, "base": base["content_hash"], "eval_sets": eval_set_hashes(data_path), "prompts": cfg.drift.prompts, "max_new_tokens": cfg.eval.decoding.resolved()["max_new_tokens"], "date_string": cfg.chat.date_string}


def eval_set_hashes(data_path: Path) -> dict[str, str]:
    return {s: pl.read_parquet(Path(data_path) / f"eval_set_{s}.parquet", columns=["eval_set_hash"])["eval_set_hash"][0] for s in SPLITS}


def base_answers(store: Store, cfg: StudyConfig, base: dict, data_path: Path, load_base: Callable[[], object], tok) -> pl.DataFrame:
    """The base's `answer_rows`: built once per base and evaluation set by whichever task
    needs it first (the others find it sealed); `load_base()` gives the base model."""

    def build(tmp: Path) -> dict:
        table = answer_rows(load_base(), tok, cfg, data_path)
        write_parquet(table, tmp / ANSWERS)
        return {"prompts": table.height}

    return pl.read_parquet(STAGE.build(STAGE.artifact(store, answers_key(cfg, base, data_path)), build) / ANSWERS)


# ---------------------------------------------------------------- one checkpoint


def previous(ckpt: dict, checkpoints: Sequence[dict]) -> dict:
    """The checkpoint before `ckpt` on its own trajectory: the SFT save before it (the base
    before the first), an RL run's save before it (its starting SFT checkpoint before the first)."""
    if ckpt["stage"] == "sft":
        earlier = [c for c in checkpoints if c["stage"] in ("base", "sft") and c["step"] < ckpt["step"]]
    else:
        start = ckpt["rl_start_step"]
        earlier = [c for c in checkpoints if c["stage"] == "rl" and c.get("rl_start_step") == start and c["step"] < ckpt["step"]]
        if not earlier:
            earlier = [c for c in checkpoints if c["stage"] in ("base", "sft") and c["step"] == start]
    if not earlier:
        raise ValueError(f"drift: no checkpoint before {ckpt['ckpt_id']} among {[c['ckpt_id'] for c in checkpoints]}")
    return max(earlier, key=lambda c: c["step"])


def key_config(cfg: StudyConfig, ckpt: dict, base: dict, prev: dict, data_path: Path) -> dict:
    def ident(c: dict) -> dict:
        return {k: c.get(k) for k in ("ckpt_id", "stage", "step", "rl_start_step", "content_hash")}

    return {"ckpt": ident(ckpt), "base": ident(base), "previous": ident(prev), "answers": answers_key(cfg, base, data_path)}


def artifact(store: Store, cfg: StudyConfig, ckpt: dict, base: dict, prev: dict, data_path: Path) -> Artifact:
    return STAGE.artifact(store, key_config(cfg, ckpt, base, prev, data_path))


def signal_row(ckpt: dict, split: str, reference: str, ref_id: str, pair: states.Pair) -> dict:
    """One `drift_by_checkpoint` row: per-prompt signals as their means over the prompts."""
    cos = signals.quantiles(pair.cosine)
    return {
        "ckpt_id": ckpt["ckpt_id"], "stage": ckpt["stage"], "step": ckpt["step"], "rl_start_step": ckpt.get("rl_start_step"),
        "split": split, "reference": reference, "ref_id": ref_id, "n_prompts": len(pair.js),
        "kl_forward": float(pair.kl_forward.mean()), "kl_reverse": float(pair.kl_reverse.mean()), "js": float(pair.js.mean()),
        "sequence_kl": float(pair.sequence_kl.mean()),
        **{f"jaccard_top{k}": float(v.mean()) for k, v in pair.jaccard.items()},
        "entropy": float(pair.entropy_y.mean()), "entropy_ref": float(pair.entropy_x.mean()),
        "margin": float(pair.margin_y.mean()), "margin_ref": float(pair.margin_x.mean()),
        **{f"cosine_{k}": v for k, v in cos.items()}, "cosine_distance": 1.0 - cos["mean"],
        "cka": signals.linear_cka(pair.hidden_x, pair.hidden_y), "mmd2": signals.rbf_mmd2(pair.hidden_x, pair.hidden_y),
    }  # fmt: skip


Read = Callable[[str, list, list], Iterable[states.Batch]]  # (ckpt_id, sequences, prompt lengths) -> its batches
READS = states.Reads(256 * 2**20)  # this process's kept reads: the toy's are 57 MB a model


def reading(models: dict[str, object], pad_id: int, batch_size: int) -> Read:
    """A `Read` of loaded models (`models`: ckpt_id -> model), nothing kept."""
    return lambda c, seqs, n: states.forward(models[c], seqs, n, pad_id, batch_size, what=c)


class Reader:
    """A task's `Read` of its checkpoints (`ckpts`: ckpt_id -> checkpoint row): a read kept
    in READS (another task's, on this worker) loads nothing; a model is loaded on its first
    read and kept for the task."""

    def __init__(self, cfg: StudyConfig, ckpts: dict[str, dict], pad_id: int):
        self.cfg, self.ckpts, self.pad_id, self.models = cfg, ckpts, pad_id, {}

    def model(self, ckpt_id: str):
        if ckpt_id not in self.models:
            self.models[ckpt_id] = load(self.cfg, self.ckpts[ckpt_id])
        return self.models[ckpt_id]

    def __call__(self, ckpt_id: str, seqs: list, n: list) -> Iterable[states.Batch]:
        c, bs = self.ckpts[ckpt_id], self.cfg.drift.batch_size
        dtype, device = placement()
        # the weights by content, the exact sequences, and how they are read
        key = None if not c.get("content_hash") else (c["content_hash"], str(dtype), device, self.pad_id, bs, tuple(map(tuple, seqs)), tuple(n))

        def size() -> int:
            config = self.model(ckpt_id).config.get_text_config()
            return states.read_bytes(seqs, n, config.vocab_size, config.hidden_size, bs)

        return READS.get(key, size, lambda: states.forward(self.model(ckpt_id), seqs, n, self.pad_id, bs, what=ckpt_id))


def measure(read: Read, answers: pl.DataFrame, ckpt: dict, refs: dict[str, dict]) -> pl.DataFrame:
    """`drift_by_checkpoint` of `ckpt` against each reference (`refs`: base / previous ->
    checkpoint row), per split; `read` gives a model's batches."""
    out = []
    for split in SPLITS:
        seqs, n = states.sequences(answers, split)
        # the references first: kept by the task before, they are the most recent when this
        # checkpoint's own read is inserted (states.Reads)
        readers = {c: read(c, seqs, n) for c in dict.fromkeys([*(r["ckpt_id"] for r in refs.values()), ckpt["ckpt_id"]])}
        pairs = states.compare(readers, [(r["ckpt_id"], ckpt["ckpt_id"]) for r in refs.values()])
        for reference, ref in refs.items():
            out.append(signal_row(ckpt, split, reference, ref["ckpt_id"], pairs[ref["ckpt_id"], ckpt["ckpt_id"]]))
    return pl.DataFrame(out, schema=SCHEMA)


def make(art: Artifact, cfg: StudyConfig, ckpt: dict, base: dict, prev: dict, data_path: Path) -> Path:
    store = open_store(art.root)

    def build(tmp: Path) -> dict:
        tok = load_tokenizer(base["path"], cfg.model.trust_remote_code)
        read = Reader(cfg, {c["ckpt_id"]: c for c in (base, prev, ckpt)}, tok.pad_token_id)
        answers = base_answers(store, cfg, base, Path(data_path), lambda: read.model(base["ckpt_id"]), tok)
        table = measure(read, answers, ckpt, {"base": base, "previous": prev})
        write_parquet(table, tmp / "drift_by_checkpoint.parquet")
        ood = table.filter((pl.col("split") == "ood") & (pl.col("reference") == "base")).row(0, named=True)
        log.info("drift %s: OOD JS from the base %.4f, cosine %.4f", ckpt["ckpt_id"], ood["js"], ood["cosine_mean"])
        return {"rows": table.height}

    return STAGE.build(art, build)


def placement() -> tuple[torch.dtype, str]:
    """How the stage reads a model: bf16 on a GPU, fp32 on the CPU."""
    return (torch.bfloat16, "cuda") if torch.cuda.is_available() else (torch.float32, "cpu")


def load(cfg: StudyConfig, ckpt: dict):
    return load_model(ckpt["path"], *placement(), cfg.model.trust_remote_code)


def _run_name(parameters: dict) -> str:
    from tasks.eval import describe

    return f"drift {describe(parameters['ckpt'])}"


@task(name=STAGE.name, task_run_name=_run_name)
def stage(artifact: Artifact, cfg: StudyConfig, ckpt: dict, base: dict, previous: dict, data: str) -> str:
    maybe_fail("drift")
    with gpu_lease(cfg.runner):
        return str(make(artifact, cfg, ckpt, base, previous, Path(data)))


# ---------------------------------------------------------------- B, S and R (analysis.md §5)

ROLES = ("B", "S", "R")


def role_checkpoints(roles: pl.DataFrame, checkpoints: pl.DataFrame) -> tuple[dict[str, dict], dict, dict[str, str]]:
    """(ckpt_id -> checkpoint row, the base's row, role B / S / R -> ckpt_id) of the svd
    stage's `checkpoint_roles` and the study's `checkpoints`."""
    by_id = {c["ckpt_id"]: c for c in checkpoints.to_dicts()}
    base = next(c for c in by_id.values() if c["stage"] == "base")
    return by_id, base, {role: c for role, c in roles.select("role", "ckpt_id").rows() if role in ROLES}


def hidden_artifact(store: Store, cfg: StudyConfig, roles: pl.DataFrame, checkpoints: pl.DataFrame, data_path: Path) -> Artifact:
    """The `hidden_*` tables' artifact: keyed by which checkpoints B, S and R are (the svd
    stage's roles: B moves when an evaluation does) and by the sequences they are read on."""
    by_id, base, picked = role_checkpoints(roles, checkpoints)
    return STAGE.artifact(store, {"hidden": {role: {k: by_id[c].get(k) for k in ("ckpt_id", "content_hash")} for role, c in picked.items()}, "answers": answers_key(cfg, base, data_path)})


def make_hidden(art: Artifact, cfg: StudyConfig, roles_path: Path, checkpoints_path: Path, data_path: Path) -> Path:
    store = open_store(art.root)
    roles, checkpoints = pl.read_parquet(roles_path), pl.read_parquet(checkpoints_path)

    def build(tmp: Path) -> dict:
        by_id, base, picked = role_checkpoints(roles, checkpoints)
        tok = load_tokenizer(base["path"], cfg.model.trust_remote_code)
        read = Reader(cfg, by_id, tok.pad_token_id)
        answers = base_answers(store, cfg, base, Path(data_path), lambda: read.model(base["ckpt_id"]), tok)
        run_id, model_name = roles["run_id"][0], roles["model_name"][0]
        pairs, recovery = hidden.tables(read, picked, answers, run_id, model_name)
        write_parquet(pairs, tmp / "hidden_pair_metrics.parquet")
        write_parquet(recovery, tmp / "hidden_recovery.parquet")
        return {"pairs": pairs.height, "recovery": recovery.height}

    return STAGE.build(art, build)


@task(name=f"{STAGE.name}-hidden", task_run_name="drift hidden")
def hidden_stage(artifact: Artifact, cfg: StudyConfig, roles: str, checkpoints: str, data: str) -> str:
    """`hidden_pair_metrics` and `hidden_recovery` of B, S and R (analysis.md §5)."""
    # closing: the study's last read, after which what this worker kept is of no further use
    with gpu_lease(cfg.runner), contextlib.closing(READS):
        return str(make_hidden(artifact, cfg, Path(roles), Path(checkpoints), Path(data)))


# ---------------------------------------------------------------- watching it live


class Live:
    """The monitor while the study runs (issue 19 §3): each ended drift task adds its
    checkpoint's OOD drift from the base to a Prefect table artifact that grows per
    checkpoint, and to the line `rlheal status` prints under the stage."""

    COLUMNS = ("ckpt_id", "stage", "step", "rl_start_step", "js", "kl_forward", "sequence_kl", "cosine_mean", "cka", "mmd2")

    def __init__(self, study: str, progress):
        self.study, self.progress = study, progress
        self.rows: list[dict] = []

    def add(self, drift_dir: str) -> None:
        table = pl.read_parquet(Path(drift_dir) / "drift_by_checkpoint.parquet")
        row = table.filter((pl.col("split") == "ood") & (pl.col("reference") == "base")).select(self.COLUMNS).row(0, named=True)
        self.rows = sorted([*self.rows, row], key=lambda r: (r["stage"] != "sft", r["rl_start_step"] or 0, r["step"]))
        from tasks.eval import describe

        self.progress.note("drift", f"last: {describe(row)}: OOD JS from the base {row['js']:.4f}, cosine {row['cosine_mean']:.4f}, MMD² {row['mmd2']:.4f}")
        try:
            from prefect.artifacts import create_table_artifact
            from prefect.context import FlowRunContext

            from rlheal.progress import artifact_key

            if FlowRunContext.get() is not None:
                rounded = [{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in self.rows]
                create_table_artifact(rounded, key=artifact_key(self.study, "drift-monitor"), description=f"{self.study}: each checkpoint's drift from the base on the OOD prompts, as the drift stage measures it")
        except Exception as err:  # the live view must never fail a study
            log.debug("drift monitor artifact not written: %s", err)


# ---------------------------------------------------------------- the study's tables


def by_checkpoint(eval_summary: pl.DataFrame) -> pl.DataFrame:
    """One row per checkpoint: accuracy_id, accuracy_ood, ce_id, ce_ood."""
    return eval_summary.pivot(on="split", index="ckpt_id", values=["accuracy", "ce"], aggregate_function="first")


def series(drift: pl.DataFrame, eval_summary: pl.DataFrame, checkpoints: pl.DataFrame, signal: str) -> pl.DataFrame:
    """Per SFT checkpoint (the base first, step order): step, ckpt_id, the rule's drift (the
    base's is 0: no drift from itself), ID accuracy, ID reference CE, training loss, and OOD
    accuracy (for the comparison only; the rule does not read it)."""
    sft = checkpoints.filter(pl.col("stage").is_in(["base", "sft"])).select("ckpt_id", "step", "train_loss")
    d = drift.filter((pl.col("split") == "ood") & (pl.col("reference") == "base")).select("ckpt_id", pl.col(signal).alias("drift"))
    acc = by_checkpoint(eval_summary)
    return (
        sft.join(d, on="ckpt_id", how="left")
        .with_columns(pl.when(pl.col("step") == 0).then(0.0).otherwise(pl.col("drift")).alias("drift"))
        .join(acc.select("ckpt_id", pl.col("accuracy_id"), pl.col("ce_id"), pl.col("accuracy_ood")), on="ckpt_id", how="left")
        .sort("step")
    )


SELECTION_SCHEMA = {"rule": STR, "ckpt_id": STR, "step": I32, "accuracy_ood": F64, "accuracy_id": F64, "signal": STR, "rho": F64}


def selection(drift: pl.DataFrame, eval_summary: pl.DataFrame, checkpoints: pl.DataFrame, signal: str, rho: float) -> pl.DataFrame:
    """`drift_selection`: the checkpoint each rule picks among the SFT checkpoints (base
    included), with its OOD accuracy: the monitor, the loss rules (lowest ID reference CE,
    lowest training loss), the last checkpoint, and the OOD-best (the oracle no rule knows)."""
    s = series(drift, eval_summary, checkpoints, signal)
    picks = {}
    # the rule walks every interval: a checkpoint without its drift or ID accuracy (a failed
    # task) leaves no pick rather than a rule run over a merged interval
    complete = not any(s.select(pl.col("drift", "accuracy_id").is_null().any()).row(0))
    if s.height >= 2 and complete:
        picks["monitor"] = s["ckpt_id"][monitor.select(s["accuracy_id"].to_list(), s["drift"].to_list(), rho)]
    for rule, column in (("lowest_id_ce", "ce_id"), ("lowest_train_loss", "train_loss")):
        if (i := monitor.lowest(s[column].to_list())) is not None:
            picks[rule] = s["ckpt_id"][i]
    picks["last"] = s["ckpt_id"][-1]
    if (best := s.drop_nulls("accuracy_ood")).height:
        picks["oracle"] = best.sort(["accuracy_ood", "step"], descending=[True, False])["ckpt_id"][0]
    by_id = {r["ckpt_id"]: r for r in s.iter_rows(named=True)}
    out = [{"rule": rule, "ckpt_id": c, "step": by_id[c]["step"], "accuracy_ood": by_id[c]["accuracy_ood"], "accuracy_id": by_id[c]["accuracy_id"], "signal": signal if rule == "monitor" else None, "rho": rho if rule == "monitor" else None} for rule, c in picks.items()]
    return pl.DataFrame(out, schema=SELECTION_SCHEMA)


CORRELATION_SCHEMA = {"signal": STR, "source": STR, "n_checkpoints": I32, "spearman_rho": F64, "ci_low": F64, "ci_high": F64}
DRIFT_SIGNALS = ("kl_forward", "kl_reverse", "js", "sequence_kl", "cosine_distance", "cka", "mmd2", "jaccard_top10")


def correlations(drift: pl.DataFrame, eval_summary: pl.DataFrame, checkpoints: pl.DataFrame, svd_vs_accuracy: pl.DataFrame | None = None) -> pl.DataFrame:
    """`drift_correlations`: Spearman's ρ with OOD accuracy across the SFT checkpoints (step
    > 0) of each drift signal (OOD prompts, from the base), the ID and OOD reference CE, and
    the svd stage's model-level summaries from the base, with a bootstrap interval."""
    acc = by_checkpoint(eval_summary)
    sft = checkpoints.filter(pl.col("stage") == "sft").select("ckpt_id", "step").join(acc, on="ckpt_id", how="left").sort("step")
    d = drift.filter((pl.col("split") == "ood") & (pl.col("reference") == "base"))
    rows = []

    def add(signal: str, source: str, table: pl.DataFrame, column: str) -> None:
        joined = sft.join(table.select("ckpt_id", pl.col(column).alias("value")), on="ckpt_id", how="left")
        c = monitor.spearman(joined["value"].to_list(), joined["accuracy_ood"].to_list())
        rows.append({"signal": signal, "source": source, "n_checkpoints": c.n, "spearman_rho": c.rho, "ci_low": c.ci_low, "ci_high": c.ci_high})

    for name in DRIFT_SIGNALS:
        add(name, "drift", d, name)
    for split in SPLITS:
        if f"ce_{split}" in acc.columns:
            add(f"ce_{split}", "eval", acc, f"ce_{split}")
    if svd_vs_accuracy is not None and svd_vs_accuracy.height:
        from tasks.svd.analysis import SUMMARIES

        k = min(svd_vs_accuracy["k_spec"].unique().to_list(), key=float)  # the smallest k-spec (a fraction or a count)
        base = svd_vs_accuracy.filter((pl.col("reference") == "base") & (pl.col("k_spec") == k)).rename({"tgt_id": "ckpt_id"})
        for name in SUMMARIES:
            add(f"{name} (k {k})", "svd", base, name)
    return pl.DataFrame(rows, schema=CORRELATION_SCHEMA)


def collect_artifact(store: Store, cfg: StudyConfig, paths: Sequence[str | Path], hidden_dir: str | Path, inputs: Sequence[str | Path]) -> Artifact:
    from rlheal.store import sha256_file

    return STAGE.artifact(store, {"collect": sorted(Store.from_path(p).key for p in paths), "hidden": Store.from_path(hidden_dir).key, "inputs": {Path(p).name: sha256_file(Path(p)) for p in inputs if Path(p).is_file()}, "signal": cfg.drift.signal, "rho": cfg.drift.rho})


@task(name=f"{STAGE.name}-tables", task_run_name="drift tables")
def collect_stage(artifact: Artifact, cfg: StudyConfig, paths: list[str], hidden_dir: str, eval_summary: str, checkpoints: str, svd_vs_accuracy: str | None) -> str:
    """The study-wide `drift_by_checkpoint`, `drift_selection` and `drift_correlations`, and
    the `hidden_*` tables of B, S and R (`hidden_stage`'s)."""

    def build(tmp: Path) -> dict:
        drift = pl.concat([pl.read_parquet(Path(p) / "drift_by_checkpoint.parquet") for p in paths]).sort("stage", "rl_start_step", "step", "split", "reference", nulls_last=True)
        summary, ckpts = pl.read_parquet(eval_summary), pl.read_parquet(checkpoints)
        vs = pl.read_parquet(svd_vs_accuracy) if svd_vs_accuracy and Path(svd_vs_accuracy).is_file() else None
        write_parquet(drift, tmp / "drift_by_checkpoint.parquet")
        write_parquet(selection(drift, summary, ckpts, cfg.drift.signal, cfg.drift.rho), tmp / "drift_selection.parquet")
        write_parquet(correlations(drift, summary, ckpts, vs), tmp / "drift_correlations.parquet")
        for name in ("hidden_pair_metrics", "hidden_recovery"):
            shutil.copyfile(Path(hidden_dir) / f"{name}.parquet", tmp / f"{name}.parquet")
        return {"rows": drift.height}

    return str(STAGE.build(artifact, build))
