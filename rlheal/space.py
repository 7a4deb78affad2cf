"""How much store space a study needs, before it runs; and telling a full disk from other failures.

`estimate` is plain arithmetic over the model's shapes (`ModelShapes`: tensor shapes and
dtypes from the safetensors headers, the selected matrices, the size of the tokenizer and
config files) and the study config: no weights are loaded. Per stage, `stored` is what the
stage leaves in the store and `working` what it holds only while it runs (the SFT trainer
state, PPO's resume point), deleted once the stage is sealed.

What each stage writes (the modules that write it):
- data: three Parquet tables (tasks/data.py);
- model: the tiny model, or a Mllama's language model, is copied in; another Hugging Face
  model is only pointed to (tasks/model.py);
- pretrain: one tiny checkpoint in float32 (tasks/pretrain/);
- sft: one standalone checkpoint per listed step > 0 in `sft.save_dtype`; while training,
  the trainer's checkpoint (float32 weights and AdamW's two moments), two of them at a save
  (tasks/sft.py);
- rl: per start and per listed update > 0, a float32 checkpoint (PPO adds its value head);
  while training, PPO's resume point (Adam's two moments, twice at a save), one per run
  running in parallel (tasks/rl/);
- eval: per checkpoint and split, the attempts and summary tables, then all of them again
  in one table (tasks/eval.py);
- svd: one cache artifact per decomposed object with all r singular values (float64) and
  the U / V columns `tasks.svd.engine.columns_plan` says that kind of object keeps, in the
  compute dtype (float64 on CPU, float32 on GPU; analysis.md §2), plus the tables;
- edit: four tables per variant, then all of them in one; a full checkpoint per edited
  variant only with `edit.keep_checkpoints` or reference_compat (tasks/edit/sweep.py);
- report: the figures and report pages (tasks/report.py).

Table sizes are the weakest part (Parquet compresses text by its content): each table is
a fixed size plus bytes per row, measured on the smoke study and on data tables of 256 to
8192 rows (polars 2.1, zstd).
At the paper's scale tables are well under 1 % of the total, checkpoints and SVDs the rest.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlheal.config import StudyConfig
from rlheal.store import existing_parent

DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

# safetensors: an 8-byte length, then a JSON header of about len(name) + 68 bytes per tensor
# (measured: 2056 bytes for the tiny model's 20 tensors).
HEADER_PER_TENSOR = 68
# manifest.json: fixed fields, then one entry (name, size, sha256) per file.
MANIFEST_BASE, MANIFEST_PER_FILE = 500, 130
# Parquet tables (measured on the smoke study: 16-hand splits, 14 matrices; and data tables
# of 256 to 8192 rows): a fixed size (schema, statistics, footer) plus bytes per row.
DATA_TRAIN = (12_000, 32, 35)  # fixed, per row, per row x multi_turn_fraction
DATA_EVAL = (7_000, 55)
# eval_attempts: fixed, per row, per row and max_new_tokens. Responses compress well: 1 byte a
# row on the smoke study (an untrained model), 9 on the toy's pretrained base (18 tokens per
# response on average, at most 64): the estimate allows 24 there, more for longer responses.
EVAL_ATTEMPTS = (5_500, 8, 0.25)
EVAL_SUMMARY = (18_000, 90)
DRIFT_TABLE, DRIFT_ANSWER_ROW = 9_000, 4  # one checkpoint's drift_by_checkpoint; answer bytes per token of the limit
HIDDEN_TABLES = 11_500  # hidden_pair_metrics + hidden_recovery of B, S and R (measured on the toy: 5.7 + 5.5 kB)
RL_TABLES = (15_500, 110)  # checkpoints + rl_log of one run; per update
SFT_TABLES = (6_400, 40)  # checkpoints + sft_log; per logged step
SVD_TABLES = 17_000  # roles, correlations, vs_accuracy
SVD_PAIR_ROW, SVD_SERIES_ROW = 200, 8.5  # svd_pair_metrics; svd_spectra and svd_principal_angles (one float each)
# editing (measured on the smoke study, 8 runs of 160 attempt rows, and the toy's, ~3400 rows):
# the four tables of one run with an empty edit_matrix_log (a baseline), its manifest (the
# variant's config), and what a non-empty edit_matrix_log adds (column statistics) plus its rows.
EDIT_TABLES, EDIT_MANIFEST = 24_300, 2_300
EDIT_MATRIX_LOG, EDIT_MATRIX_ROW = 4_600, 24
# The study-wide copy of the attempts compresses about twice as well as one run's table (the
# same hands, similar responses): 7 bytes a row against 15 on the toy.
EDIT_COMBINED_ROW = 0.5
REPORT = 700_000  # six figures, report.md and report.html (the smoke study: 650 kB)
TASK_RESULT = 450  # one Prefect result record per task run, kept in the store
TRAINER_EXTRA = 40_000  # a trainer checkpoint's scheduler, RNG, trainer_state and training_args files
BLOCK = 4096  # a file takes whole blocks of the filesystem: up to this much more than its size
CHECKPOINT_FILES = 7  # weights, config, generation config, tokenizer (2), chat template, manifest


@dataclass(frozen=True)
class ModelShapes:
    """What the estimate needs to know of the starting model, all read without loading it.

    `tensors`: (name, number of elements, bytes per element as stored) of every tensor a
    checkpoint of this model holds (a tied lm_head is not stored); `files`: bytes of the
    other files a checkpoint directory carries (config, tokenizer); `matrices` / `others`:
    (m, n) of the matrices the svd stage selects / of every other 2-D tensor."""

    tensors: tuple[tuple[str, int, int], ...]
    files: int
    matrices: tuple[tuple[int, int], ...]
    others: tuple[tuple[int, int], ...] = ()
    hidden_size: int = 0
    copied: bool = True  # the model stage copies it into the store (builtin, Mllama)

    @property
    def parameters(self) -> int:
        return sum(n for _, n, _ in self.tensors)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the weights as the model is stored."""
        return sum(n * b for _, n, b in self.tensors)

    def checkpoint_bytes(self, bytes_per_element: int | None = None) -> int:
        """One standalone checkpoint: the weights (in `bytes_per_element`, default as stored),
        the safetensors header, the config and tokenizer files and the manifest."""
        weights = self.stored_bytes if bytes_per_element is None else self.parameters * bytes_per_element
        header = 8 + sum(len(name) + HEADER_PER_TENSOR for name, _, _ in self.tensors)
        return weights + header + self.files + MANIFEST_BASE + MANIFEST_PER_FILE * 6


@dataclass(frozen=True)
class StageSpace:
    """One stage: bytes it stores, bytes it holds only while it runs, files it writes."""

    stage: str
    stored: int
    working: int = 0
    files: int = 0
    what: str = ""


@dataclass(frozen=True)
class Estimate:
    """Per stage, in the order the study runs them."""

    stages: tuple[StageSpace, ...]

    @property
    def total(self) -> int:
        """Bytes the finished study holds (the sum of its files' sizes)."""
        return sum(s.stored for s in self.stages)

    @property
    def peak(self) -> int:
        """The most disk the study takes at once; see `still_needed`."""
        return self.still_needed()

    def still_needed(self, done: Mapping[str, float] | None = None) -> int:
        """Disk a run still needs (`done`: stage -> fraction already sealed, for a resumed run):
        at each stage, what the stages up to it still store plus its own working space, at
        the worst stage; plus up to a filesystem block per file (small files round up)."""
        done = done or {}
        held = worst = files = 0
        for s in self.stages:
            left = 1.0 - min(1.0, max(0.0, done.get(s.stage, 0.0)))
            held += s.stored * left
            files += s.files * left
            worst = max(worst, held + (s.working if left > 0 else 0))
        return round(worst + BLOCK * files)

    def by_stage(self) -> dict[str, int]:
        return {s.stage: s.stored for s in self.stages}


# ---------------------------------------------------------------------------- the study's counts


def rl_starts(cfg: StudyConfig) -> list[int]:
    """SFT steps RL runs from (rl.from_steps; `all` includes step 0, the base)."""
    if cfg.rl.save_steps[-1] == 0:
        return []
    return list(cfg.sft.save_steps) if cfg.rl.from_steps == "all" else list(cfg.rl.from_steps)


def has_r(cfg: StudyConfig) -> bool:
    """Whether role R exists: an RL run from `roles.rl_start` (default the last SFT step)."""
    start = cfg.roles.rl_start if cfg.roles.rl_start is not None else cfg.sft.save_steps[-1]
    return start in rl_starts(cfg)


@dataclass(frozen=True)
class SvdPlan:
    """The svd stage's objects (analysis.md §1.2, `tasks.svd.roles.plan_comparisons`) for a study
    whose B is its first SFT checkpoint: the most comparisons B can give."""

    checkpoints: int  # decomposed checkpoints: base, every SFT step > 0, R
    deltas: int
    noise: int
    comparisons: int  # weight pairs, noise controls and delta pairs that are measured


def svd_plan(cfg: StudyConfig) -> SvdPlan:
    n_sft = sum(1 for s in cfg.sft.save_steps if s > 0)
    r = has_r(cfg)
    if n_sft > 1:  # base -> each SFT step, B -> each later one (B -> S among them), S -> R, B -> R
        weights, noise = 2 * n_sft - 1 + 2 * r, 2 + 2 * r
    else:  # B = S: base -> S, S -> S, S -> R
        weights, noise = 2 + r, 2 + r
    noise = noise if cfg.svd.noise_control else 0
    return SvdPlan(checkpoints=1 + n_sft + r, deltas=1 + r, noise=noise, comparisons=weights + noise + r)


def svd_object_bytes(shapes: Sequence[tuple[int, int]], columns: Sequence[tuple[int, int]], vector_bytes: int) -> int:
    """One SVD cache artifact: per matrix, r singular values in float64 and (top + tail)
    columns of U (m each) and V (n each) in the compute dtype (tasks/svd/engine.py)."""
    total = MANIFEST_BASE
    for (m, n), (top, tail) in zip(shapes, columns, strict=True):
        total += 8 * min(m, n) + vector_bytes * (m + n) * (top + tail)
        total += 8 + 5 * (HEADER_PER_TENSOR + 8) + MANIFEST_PER_FILE + 80  # header, manifest and columns entries
    return total


def _k(spec: int | float, r: int) -> int:
    """tasks.svd.metrics.resolve_k: an int is absolute, a float a fraction of r (at least 1)."""
    return min(r, spec) if isinstance(spec, int) else max(1, min(r, int(spec * r)))


# ---------------------------------------------------------------------------- the estimate


def estimate(
    cfg: StudyConfig,
    model: ModelShapes,
    columns: Mapping[str, Sequence[tuple[int, int]]],
    edit_roles: Mapping[str, str] | None = None,
    n_variants: int = 0,
    n_baselines: int = 0,
    sft_bytes: int = 4,
    cuda: bool = False,
) -> Estimate:
    """Store space per stage (bytes) of a study of `model` under `cfg`.

    `columns`: `tasks.svd.engine.columns_plan` (kind -> (top, tail) per matrix: checkpoint,
    delta, noise and edit:<role> for the roles editing reads); `edit_roles`: role ->
    checkpoint kind (sft / rl / base) of each role editing reads, for keep_checkpoints;
    `n_variants` / `n_baselines`: the editing sweep; `sft_bytes`: bytes per element of
    `sft.save_dtype`; `cuda`: the svd stage computes in float32 there, float64 on the CPU."""
    stages: list[StageSpace] = []
    parallel = max(1, cfg.runner.n_workers)  # tasks of a stage run side by side, up to the runner's workers
    d = cfg.data
    train_rows = DATA_TRAIN[0] + d.train_size * (DATA_TRAIN[1] + DATA_TRAIN[2] * d.multi_turn_fraction)
    data = train_rows + 2 * (DATA_EVAL[0] + DATA_EVAL[1] * d.eval_size) + MANIFEST_BASE
    stages.append(StageSpace("data", round(data), files=4, what=f"{d.train_size} SFT rows, 2 x {d.eval_size} evaluation hands"))

    fp32 = model.checkpoint_bytes(4)
    if model.copied:
        stages.append(StageSpace("model", model.checkpoint_bytes(), files=CHECKPOINT_FILES, what=f"{model.parameters:,} parameters, copied into the store"))
    else:
        stages.append(StageSpace("model", 1_000, files=2, what="points to the model's own directory (not copied)"))
    if cfg.pretrain.enabled:
        stages.append(StageSpace("pretrain", fp32 + 4_000, files=CHECKPOINT_FILES + 1, what="1 checkpoint (float32)"))

    # sft: checkpoints in save_dtype (LoRA: merged, saved whole); the trainer state is float32
    # weights (LoRA: the adapter) and AdamW's two float32 moments, twice while a save replaces it.
    s = cfg.sft
    n_sft = sum(1 for k in s.save_steps if k > 0)
    trainable = _lora_parameters(cfg, model) if s.lora.enabled else model.parameters
    trainer = 12 * trainable + model.files + TRAINER_EXTRA
    logged = s.max_steps // s.log_every + s.max_steps // s.ce_every + 1
    sft = n_sft * model.checkpoint_bytes(sft_bytes) + SFT_TABLES[0] + SFT_TABLES[1] * logged + MANIFEST_BASE
    stages.append(StageSpace("sft", sft, 2 * trainer if n_sft else 0, n_sft * CHECKPOINT_FILES + 3, f"{n_sft} checkpoints ({_dtype_name(sft_bytes)})"))

    # rl: float32 checkpoints (PPO adds its value head h -> h/4 -> h/8 -> 1); while a run trains,
    # its resume point (PPO: Adam's two float32 moments; GRPO: the trainer's state), twice at a save.
    starts = rl_starts(cfg)
    runs, n_rl = len(starts), sum(1 for u in cfg.rl.save_steps if u > 0)
    ppo = cfg.rl.algorithm == "ppo"
    h = model.hidden_size
    head_params = h * (h // 4) + h // 4 + (h // 4) * (h // 8) + h // 8 + h // 8 + 1 if ppo else 0
    head = 4 * head_params + 8 + 6 * (HEADER_PER_TENSOR + 20) if ppo else 0
    resume = 8 * (model.parameters + head_params) + 30_000 if ppo else trainer
    rl = runs * (n_rl * (fp32 + head) + RL_TABLES[0] + RL_TABLES[1] * cfg.rl.num_updates + MANIFEST_BASE)
    rl += RL_TABLES[0] + RL_TABLES[1] * cfg.rl.num_updates * runs if runs else 0  # the study-wide tables
    what = f"{runs * n_rl} checkpoints ({runs} starts x {n_rl} saves, float32{', value head' if ppo else ''})" if runs else "no RL"
    stages.append(StageSpace("rl", rl, 2 * resume * min(parallel, runs), runs * (n_rl * (CHECKPOINT_FILES + ppo) + 3) + 3 * bool(runs), what))

    # eval: every checkpoint on both splits, then one study-wide copy of the rows.
    n_ckpt = 1 + n_sft + runs * n_rl
    attempts = d.eval_size * cfg.verifier.verify_iter  # at most: an unsolved hand uses every attempt
    per_row = EVAL_ATTEMPTS[1] + EVAL_ATTEMPTS[2] * cfg.eval.decoding.resolved()["max_new_tokens"]
    one = EVAL_ATTEMPTS[0] + per_row * attempts + EVAL_SUMMARY[0] + MANIFEST_BASE
    combined = EVAL_ATTEMPTS[0] + per_row * attempts * 2 * n_ckpt + EVAL_SUMMARY[0] + EVAL_SUMMARY[1] * 2 * n_ckpt
    stages.append(StageSpace("eval", round(2 * n_ckpt * one + combined), files=3 * (2 * n_ckpt + 1), what=f"{n_ckpt} checkpoints x 2 splits, tables"))

    # drift (when on): one small table per checkpoint but the base, the base's answers once
    # (prompt and answer token ids per prompt), B / S / R's hidden tables (in their artifact
    # and again in the study-wide one), the study-wide tables.
    if cfg.drift.enabled:
        prompts = 2 * min(cfg.drift.prompts or d.eval_size, d.eval_size)
        answers = MANIFEST_BASE + DRIFT_ANSWER_ROW * prompts * cfg.eval.decoding.resolved()["max_new_tokens"]
        tables = (n_ckpt - 1) * (DRIFT_TABLE + MANIFEST_BASE) + answers + 2 * HIDDEN_TABLES + MANIFEST_BASE + DRIFT_TABLE * 3 + MANIFEST_BASE
        stages.append(StageSpace("drift", round(tables), files=2 * n_ckpt + 9, what=f"{n_ckpt - 1} checkpoints x 2 splits x 2 references, the base's answers to {prompts} prompts, B / S / R's hidden states, tables"))

    # svd: the cache (kind -> columns per matrix), then the tables.
    vb = 4 if cuda else 8
    plan = svd_plan(cfg)
    shapes = list(model.matrices)
    every = shapes + list(model.others)
    size = {kind: svd_object_bytes(every if len(cols) > len(shapes) else shapes, cols, vb) for kind, cols in columns.items()}
    # A checkpoint editing reads stores its edit:<role> columns instead of the measured ones;
    # one with two roles (B = S when SFT saves one step) the wider of the two.
    ckpt_of = {"base": "base", "B": "B" if n_sft > 1 else "S", "S": "S", "R": "R"}
    wide: dict[str, tuple[int, int]] = {}
    for kind, nbytes in size.items():
        role = kind.removeprefix("edit:")
        if kind.startswith("edit:") and (role != "R" or has_r(cfg)):
            wide[ckpt_of[role]] = max(wide.get(ckpt_of[role], (0, 0)), (nbytes, len(columns[kind])))
    plain = plan.checkpoints - len(wide)
    cache = plain * size["checkpoint"] + sum(b for b, _ in wide.values()) + plan.deltas * size["delta"] + plan.noise * size["noise"]
    cache_files = (plain + plan.deltas + plan.noise) * (len(shapes) + 1) + sum(n + 1 for _, n in wide.values())
    sum_r = sum(min(m, n) for m, n in shapes)
    sum_k = sum(_k(spec, min(m, n)) for m, n in shapes for spec in cfg.svd.k)
    tables = SVD_TABLES + SVD_PAIR_ROW * plan.comparisons * len(shapes) * len(cfg.svd.k)
    tables += SVD_SERIES_ROW * ((plan.checkpoints + plan.deltas) * sum_r + 2 * plan.comparisons * sum_k)
    objects = plan.checkpoints + plan.deltas + plan.noise
    what = f"{objects} SVDs ({plan.checkpoints} checkpoints, {plan.deltas} deltas, {plan.noise} noise controls; U, V in {_dtype_name(vb)}), tables"
    stages.append(StageSpace("svd", round(cache + tables), files=cache_files + 7, what=what))

    # editing: per variant four small tables, then one study-wide copy; checkpoints if kept.
    e = cfg.edit
    n_runs = n_variants + n_baselines
    if e.enabled and n_runs:
        matrix_log = EDIT_MATRIX_LOG + EDIT_MATRIX_ROW * len(shapes)  # a variant's; a baseline's is empty
        one = EDIT_TABLES + EDIT_MANIFEST + per_row * 2 * attempts
        combined = EDIT_TABLES + MANIFEST_BASE + MANIFEST_PER_FILE * 4 + (EDIT_MATRIX_LOG if n_variants else 0)
        combined += n_variants * EDIT_MATRIX_ROW * len(shapes) + EDIT_COMBINED_ROW * per_row * 2 * attempts * n_runs
        stored, files, kept = n_runs * one + n_variants * matrix_log + combined, 5 * (n_runs + 1), ""
        if e.keep_checkpoints or e.reference_compat:  # in the target's dtype (quirk 5: float16)
            per_ckpt = max(model.checkpoint_bytes(2 if e.reference_compat else {"sft": sft_bytes, "rl": 4}.get(k)) for k in (edit_roles or {"S": "sft"}).values())
            stored, files, kept = stored + n_variants * per_ckpt, files + n_variants * CHECKPOINT_FILES, f", {n_variants} edited checkpoints"
        stages.append(StageSpace("edit", round(stored), files=files, what=f"{n_variants} variants + {n_baselines} baselines, tables{kept}"))
    else:
        stages.append(StageSpace("edit", 0, what="no editing"))

    tasks = 5 + runs + 2 * n_ckpt + n_runs + 4 + (n_ckpt + 1 if cfg.drift.enabled else 0)
    stages.append(StageSpace("report", REPORT + TASK_RESULT * tasks, files=10 + tasks, what="figures, report pages, task records"))
    return Estimate(tuple(stages))


def _lora_parameters(cfg: StudyConfig, model: ModelShapes) -> int:
    """Adapter parameters of LoRA (r x (m + n) per targeted matrix), what its trainer state holds."""
    return sum(cfg.sft.lora.r * (m + n) for m, n in model.matrices)


def _dtype_name(nbytes: int) -> str:
    return {8: "float64", 4: "float32", 2: "16-bit"}.get(nbytes, f"{nbytes} bytes per value")


# ---------------------------------------------------------------------------- free space


def free_bytes(path: str | Path) -> int:
    """Free space of the filesystem that holds (or will hold) `path`."""
    return shutil.disk_usage(existing_parent(path)).free


def human(n: float) -> str:
    """Decimal units, three significant digits: 1.23 MB, 45.6 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def format_estimate(est: Estimate, store: str | Path, free: int | None = None, needed: int | None = None) -> str:
    """The table `rlheal validate` and `rlheal run` print."""
    lines = [f"store space (estimated from the model's shapes and the config) in {Path(store).expanduser().absolute()}:"]
    for s in est.stages:
        work = f" (+{human(s.working)} while it runs)" if s.working else ""
        lines.append(f"  {s.stage:<9}{human(s.stored):>10}  {s.what}{work}")
    lines.append(f"  {'total':<9}{human(est.total):>10}  at most {human(est.peak)} of disk at once (working space, filesystem blocks)")
    if free is not None:
        still = "" if needed is None or needed == est.peak else f"; this run still needs {human(needed)}"
        lines.append(f"  free on the store's filesystem: {human(free)}{still}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- a full disk

_NO_SPACE = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded", "enospc")
# torch.save reports a failed write without its cause ("[enforce fail at inline_container.cc]
# ... unexpected pos", "PytorchStreamWriter failed writing file"): a full disk when the store
# has no room left (tasks/rl's resume point, the SFT trainer state).
_WRITE_FAILED = ("inline_container.cc", "pytorchstreamwriter", "iostream error", "file write failed")


def exception_chain(err: BaseException):
    """`err` and every exception it came from (__cause__, __context__, exception groups)."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def no_space_cause(err: BaseException, store: str | Path | None = None, needed: int = 0) -> BaseException | None:
    """The exception in `err`'s chain that is a full disk, or None: an OSError ENOSPC / EDQUOT,
    a safetensors, polars or other error whose text says so, or torch's failed write while
    the store has less free space than `needed` (at least 1 MiB)."""
    for e in exception_chain(err):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        text = str(e).lower()
        if any(s in text for s in _NO_SPACE):
            return e
        if store is not None and any(s in text for s in _WRITE_FAILED):
            try:
                if free_bytes(store) < max(needed, 1 << 20):
                    return e
            except OSError:
                pass
    return None
