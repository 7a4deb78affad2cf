"""Stage `sft`: supervised fine-tuning with TRL, checkpoints at listed steps (training.md §2, §5).

Store layout for one SFT run (key K = model, data, sft and chat config):
- `sft/K-s<step>/`: one sealed, standalone HF checkpoint per listed step > 0;
- `sft/.work/K/checkpoint-<step>/`: the latest trainer state (optimizer, scheduler,
  RNG), the resume point after a kill; deleted once the run is sealed;
- `sft/K/`: the sealed run, tables `checkpoints` and `sft_log`.
Step 0 is the starting model itself: registered with its path and hash, not copied.

Precision (`training_precision`): the weights the optimizer updates are float32 on every
device, with bf16 autocast on CUDA (the authors' bf16 mixed precision); checkpoints are
written in `sft.save_dtype`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import polars as pl
import torch
from datasets import Dataset
from prefect import task
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from rlheal.caching import Stage, open_store
from rlheal.config import SftSection, StudyConfig
from rlheal.faults import maybe_fail
from rlheal.runners import gpu_lease
from rlheal.store import Artifact, Store, write_parquet
from tasks import lm
from tasks.model import model_dir
from tasks.chat import prompt_completion_ids
from tasks.data import ce_target

STAGE = Stage("sft", version="2", tables=("checkpoints", "sft_log"))  # 2: fp32 master weights on GPU, save_dtype, CE of the trained target (issue 14)
DONE = ".complete"
# Files of a trainer checkpoint that belong to the resume point, not to the model.
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin", "scaler.pt", DONE}
log = logging.getLogger("rlheal.sft")


# ---------------------------------------------------------------------------- schedule


def lr_factor(step: int, cfg: SftSection) -> float:
    """Multiplier of the learning rate at optimizer step `step` (0-based; training.md §2.2).

    The trainer logs, at `global_step` g, the rate of the step it has just taken, so the
    `learning_rate` of `sft_log`'s row g is `sft.learning_rate * lr_factor(g - 1)`."""
    w = cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    if cfg.lr_schedule == "log_warmup_constant":
        # The authors' effective DeepSpeed schedule: lr * ln(s + 1) / ln W, step 0 at lr 0.
        return 1.0 if w <= 1 else min(1.0, math.log(step + 1) / math.log(w))
    if cfg.lr_schedule == "linear_warmup_constant":
        return 1.0 if w == 0 else min(1.0, step / w)
    # cosine with linear warm-up: what the authors' script asked for
    if step < w:
        return step / w
    span = max(1, cfg.max_steps - w)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / span)))


def make_optimizer(model, args, cfg: SftSection):
    """AdamW and the schedule of training.md §2.2. The hyperparameters are read from the
    trainer's `args` (one object, written from `sft` by `trainer_args`), so what the
    trainer records in training_args.bin is what the optimizer used; `cfg` gives the shape
    of the schedule only."""
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))


# ---------------------------------------------------------------------------- precision


def training_precision(device: str | torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(weight dtype, autocast dtype) of SFT on `device` (training.md §1; issue 14 §3).

    The weights stay float32 everywhere: at lr 1e-6 an Adam step moves a weight by about
    1e-6, while half a bf16 ulp of a weight of 0.02 is 6e-5, so bf16 weights would round
    most updates away. On CUDA the forward and backward run under bf16 autocast (the
    authors' bf16 mixed precision), as PPO and GRPO do; on CPU everything is float32."""
    return torch.float32, torch.bfloat16 if torch.device(device).type == "cuda" else None


def save_dtype(cfg: SftSection, model_path: str | Path) -> torch.dtype:
    """`sft.save_dtype` as a torch dtype; `auto` is the starting model's stored dtype
    (config.json's `dtype`, `torch_dtype` in older files; float32 when it names none)."""
    name = cfg.save_dtype
    if name == "auto":
        config = json.loads((Path(model_path) / "config.json").read_text())
        name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def save_bytes(cfg: SftSection, model_path: str | Path) -> int:
    """Bytes per value of a checkpoint this stage writes (`save_dtype`), for space estimates."""
    return torch.empty(0, dtype=save_dtype(cfg, model_path)).element_size()


def cast_checkpoint(path: Path, dtype: torch.dtype) -> None:
    """Rewrite a saved HF directory's floating tensors (every safetensors shard) in `dtype`
    and record it in config.json; a no-op where they already are."""
    total, cast = 0, False
    for f in sorted(path.glob("*.safetensors")):
        tensors = load_file(f)
        if any(t.is_floating_point() and t.dtype != dtype for t in tensors.values()):
            tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
            save_file(tensors, f, metadata={"format": "pt"})
            cast = True
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = path / "model.safetensors.index.json"
    if cast and index.is_file():
        meta = json.loads(index.read_text())
        meta.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(meta, indent=2))
    config, name = json.loads((path / "config.json").read_text()), str(dtype).removeprefix("torch.")
    if config.get("dtype", config.get("torch_dtype")) != name:
        config.pop("torch_dtype", None)
        (path / "config.json").write_text(json.dumps({**config, "dtype": name}, indent=2))


# ---------------------------------------------------------------------------- data


def tokenized_rows(tok, table: pl.DataFrame, n_rows: int, date_string: str | None) -> Dataset:
    """`input_ids` + `completion_mask` for the first `n_rows` rows: step s consumes rows
    [B*s, B*(s+1)) because the sampler is sequential (training.md §2.2)."""
    ids, masks = [], []
    for prompt, completion in zip(table["prompt"].head(n_rows).to_list(), table["completion"].head(n_rows).to_list()):
        seq, n_prompt = prompt_completion_ids(tok, prompt, completion, date_string)
        ids.append(seq)
        masks.append([0] * n_prompt + [1] * (len(seq) - n_prompt))
    return Dataset.from_dict({"input_ids": ids, "completion_mask": masks})


# ---------------------------------------------------------------------------- checkpoints


def merged_copy(model):
    """Full fp32 weights of a (possibly LoRA-wrapped) model: the analysis needs full matrices."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).float().merge_and_unload()


def export_checkpoint(src: Path, dst: Path, model=None, dtype: torch.dtype = torch.float32) -> None:
    """Copy a trainer checkpoint's model and tokenizer files (not its optimizer state),
    weights in `dtype`; a LoRA model is merged in fp32 and saved whole instead of its adapter."""
    if model is not None and hasattr(model, "merge_and_unload"):
        merged_copy(model).save_pretrained(dst, safe_serialization=True)
        skip = TRAINER_FILES | {"adapter_model.safetensors", "adapter_config.json", "README.md"}
    else:
        skip = TRAINER_FILES
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
    cast_checkpoint(dst, dtype)


class StepCheckpoints(TrainerCallback):
    """Save at exactly the listed steps, seal each into the store, keep one resume point."""

    def __init__(self, store: Store, run: Artifact, steps: list[int], started: float, dtype: torch.dtype = torch.float32):
        self.store, self.run, self.steps, self.started, self.dtype = store, run, set(steps), started, dtype

    def on_step_end(self, args, state, control, **kw):
        control.should_save = state.global_step in self.steps

    def on_save(self, args, state, control, model=None, **kw):
        src = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        losses = [e["loss"] for e in state.log_history if "loss" in e]
        extra = {"step": state.global_step, "train_loss": losses[-1] if losses else None, "wall_seconds": time.time() - self.started}
        art = self.run.step(state.global_step)
        self.store.build(art, lambda tmp: (export_checkpoint(src, tmp, model, self.dtype), extra)[1], config={"run": self.run.key, "step": state.global_step})
        (src / DONE).touch()
        for old in Path(args.output_dir).glob("checkpoint-*"):
            if old != src:
                shutil.rmtree(old, ignore_errors=True)
        log.info("sft step=%d sealed at %s (train loss %s)", state.global_step, art.path, extra["train_loss"])


class ReferenceLoss(TrainerCallback):
    """Every `ce_every` steps: teacher-forced CE of the OOD and ID trained-target answers
    (§7.3; `ce_target` names them), kept in the trainer's log history so it survives a resume."""

    def __init__(self, tok, tables: dict[str, pl.DataFrame], every: int, hands: int, date_string: str | None):
        self.tok, self.tables, self.every, self.hands, self.date = tok, tables, every, hands, date_string

    def _measure(self, state, model):
        row = {"step": state.global_step}
        for split, table in self.tables.items():
            row[f"ce_{split}"] = lm.reference_ce(model, self.tok, table, self.hands, self.date)
        state.log_history.append(row)

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step == 0:
            self._measure(state, model)

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step % self.every == 0:
            self._measure(state, model)


class LogProgress(TrainerCallback):
    """About twenty log lines per run, whatever its length (the trainer's own per-step
    printing is off: it buried the study's progress lines)."""

    def on_log(self, args, state, control, logs=None, **kw):
        every = max(1, state.max_steps // 20)
        if logs and "loss" in logs and (state.global_step % every == 0 or state.global_step == state.max_steps):
            log.info("sft step %d/%d loss %.4f lr %.3g", state.global_step, state.max_steps, logs["loss"], logs.get("learning_rate", float("nan")))


def last_complete(out: Path) -> Path | None:
    done = [p for p in out.glob("checkpoint-*") if (p / DONE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


# ---------------------------------------------------------------------------- training


def trainer_args(cfg: StudyConfig, out: Path, device: str | torch.device):
    """TRL's SFTConfig for `device`: the one holder of the optimizer's hyperparameters
    (`make_optimizer` reads them back) and of the mixed precision of `training_precision`."""
    from trl import SFTConfig

    s = cfg.sft
    _, autocast = training_precision(device)
    return SFTConfig(
        output_dir=str(out),
        max_steps=s.max_steps,
        per_device_train_batch_size=s.per_device_batch_size,
        # global batch = per-device batch x accumulation x data-parallel processes
        gradient_accumulation_steps=max(1, s.batch_size // (s.per_device_batch_size * int(os.environ.get("WORLD_SIZE", "1")))),
        learning_rate=s.learning_rate,
        adam_beta1=s.adam_beta1,
        adam_beta2=s.adam_beta2,
        adam_epsilon=s.adam_epsilon,
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        logging_steps=s.log_every,
        save_strategy="no",  # saves come from StepCheckpoints at the listed steps
        report_to="none",
        bf16=autocast == torch.bfloat16,  # autocast over the model's fp32 weights
        use_cpu=torch.device(device).type == "cpu",
        activation_checkpointing=s.gradient_checkpointing,  # transformers 5 name of the same switch
        train_sampling_strategy="sequential",
        completion_only_loss=True,
        max_length=None,
        seed=cfg.data.train_seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def train(store: Store, run: Artifact, cfg: StudyConfig, model_path: Path, data_path: Path) -> None:
    """Train to the largest listed step, resuming from the last complete trainer state. The
    trainer seeds, initialises adapters and shuffles through torch's global random stream,
    which RL rollouts sample from: on the thread runner an RL run and SFT take turns
    (lm.GLOBAL_RNG), while evaluations run beside either."""
    with lm.GLOBAL_RNG:
        _train(store, run, cfg, model_path, data_path)


def _train(store: Store, run: Artifact, cfg: StudyConfig, model_path: Path, data_path: Path) -> None:
    from peft import get_peft_model
    from transformers import PrinterCallback
    from trl import SFTTrainer

    s = cfg.sft
    todo = [k for k in s.save_steps if k > 0 and not store.is_sealed(run.step(k))]
    if not todo:
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights, _ = training_precision(device)
    tok = lm.load_tokenizer(model_path, cfg.model.trust_remote_code)
    model = lm.load_model(model_path, weights, device, cfg.model.trust_remote_code)
    if s.lora.enabled:
        model = get_peft_model(model, lm.lora_config(s.lora, model, "sft.lora"))
    train_rows = pl.read_parquet(data_path / "sft_train.parquet")
    dataset = tokenized_rows(tok, train_rows, s.max_steps * s.batch_size, cfg.chat.date_string)
    longest = max(len(x) for x in dataset["input_ids"])
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and longest > limit:
        raise ValueError(f"an SFT row has {longest} tokens, more than the model's {limit} positions")
    evals = {split: pl.read_parquet(data_path / f"eval_set_{split}.parquet") for split in ("ood", "id")}

    out = run.work_dir
    out.mkdir(parents=True, exist_ok=True)
    args = trainer_args(cfg, out, device)
    opt, sched = make_optimizer(model, args, s)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        optimizers=(opt, sched),
        callbacks=[StepCheckpoints(store, run, s.save_steps, time.time(), dtype=save_dtype(s, model_path)), ReferenceLoss(tok, evals, s.ce_every, cfg.eval.ce_hands, cfg.chat.date_string), LogProgress()],
    )
    trainer.remove_callback(PrinterCallback)
    resume = last_complete(out)
    if resume:
        log.info("sft resumes from %s", resume)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)


def tables(store: Store, run: Artifact, cfg: StudyConfig, model_path: Path, model_hash: str, target: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`checkpoints` (one row per listed step) and `sft_log` (one row per logged step;
    `target` names the answer its `ce_id` / `ce_ood` score, column `ce_target` as in eval_summary)."""
    rows = [base_row(model_path, model_hash), *(checkpoint_row(store, run, step) for step in cfg.sft.save_steps if step > 0)]
    history: list[dict] = []
    state_file = max(run.work_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]), default=None)
    if state_file is not None:
        history = json.loads(state_file.read_text())["log_history"]
    logs = pl.DataFrame(
        [{"step": e["step"], "train_loss": e.get("loss"), "learning_rate": e.get("learning_rate"), "grad_norm": e.get("grad_norm"), "ce_id": e.get("ce_id"), "ce_ood": e.get("ce_ood")} for e in history if "step" in e and ("loss" in e or "ce_id" in e)],
        schema={"step": pl.Int32, "train_loss": pl.Float64, "learning_rate": pl.Float64, "grad_norm": pl.Float64, "ce_id": pl.Float64, "ce_ood": pl.Float64},
    )
    # one row per step: loss and CE logged at the same step are merged
    logs = logs.group_by("step", maintain_order=True).agg(pl.all().drop_nulls().first()).sort("step").with_columns(ce_target=pl.lit(target, pl.String))
    ckpts = pl.DataFrame(rows, schema_overrides={"step": pl.Int32, "parent": pl.String, "train_loss": pl.Float64, "wall_seconds": pl.Float64})
    return ckpts, logs


def base_row(model_path: Path, model_hash: str) -> dict:
    """The `checkpoints` row of the starting model (step 0)."""
    return {"ckpt_id": "base", "stage": "base", "step": 0, "parent": None, "path": str(model_path), "content_hash": model_hash, "train_loss": None, "wall_seconds": 0.0}


def checkpoint_row(store: Store, run: Artifact, step: int) -> dict:
    """The `checkpoints` row of a sealed saved step (its weights' hash from the manifest the
    seal check has just verified them against: a 20 GB checkpoint is not read again)."""
    art = run.step(step)
    m = store.manifest(art)
    content_hash = lm.weights_hash_of({rel: f["sha256"] for rel, f in m["files"].items()})
    return {"ckpt_id": f"sft-{step}", "stage": "sft", "step": step, "parent": "base", "path": str(art.path), "content_hash": content_hash, "train_loss": m.get("train_loss"), "wall_seconds": m.get("wall_seconds")}


class Sealed:
    """The run's `checkpoints` rows as its steps are sealed, while it trains (issue 18: the
    flow evaluates a checkpoint, and starts RL from it, as soon as it exists): `new()` gives
    the rows not given before, base first, then the saved steps in order."""

    def __init__(self, store: Store, run: Artifact, cfg: StudyConfig, model: Path):
        self.store, self.run = store, run
        self.base = base_row(model_dir(model), store.manifest(model)["weights_sha256"])
        self.steps = [k for k in cfg.sft.save_steps if k > 0]
        self.given: set[int] = set()

    def new(self) -> list[dict]:
        rows = [] if 0 in self.given else [self.base]
        self.given.add(0)
        for k in self.steps:
            if k not in self.given and self.store.is_sealed(self.run.step(k)):
                rows.append(checkpoint_row(self.store, self.run, k))
                self.given.add(k)
        return rows

    @property
    def complete(self) -> bool:
        return self.given >= {0, *self.steps}

    def missing(self) -> list[int]:
        return [k for k in self.steps if k not in self.given]


def key_config(cfg: StudyConfig) -> dict:
    return {"sft": cfg.sft.model_dump(), "chat": cfg.chat.model_dump(), "ce_hands": cfg.eval.ce_hands, "seed": cfg.data.train_seed}


def artifact(store: Store, cfg: StudyConfig, model_art: Artifact, data_art: Artifact) -> Artifact:
    return STAGE.artifact(store, key_config(cfg), inputs=[model_art, data_art])


def run(store: Store, cfg: StudyConfig, model_art_path: Path, data_path: Path) -> Path:
    """Train (or find) the SFT run; plain function, no Prefect needed."""
    art = artifact(store, cfg, Store.from_path(model_art_path), Store.from_path(data_path))
    return make(art, cfg, Path(model_art_path), Path(data_path))


@task(name=STAGE.name, task_run_name="sft steps={cfg.sft.save_steps}")
def stage(artifact: Artifact, cfg: StudyConfig, model: str, data: str) -> str:
    maybe_fail("sft")
    with gpu_lease(cfg.runner):
        return str(make(artifact, cfg, Path(model), Path(data)))


def make(run_art: Artifact, cfg: StudyConfig, model: Path, data_path: Path) -> Path:
    """SFT run `run_art` from the model artifact `model` on the data artifact `data_path`:
    checkpoints are sealed as they are saved, the run (its tables) once training ends."""
    store = open_store(run_art.root)
    model_path = model_dir(model)
    model_hash = store.manifest(model)["weights_sha256"]

    def build(tmp: Path) -> dict:
        train(store, run_art, cfg, model_path, data_path)
        ckpts, logs = tables(store, run_art, cfg, model_path, model_hash, ce_target(pl.read_parquet(data_path / "eval_set_ood.parquet"), cfg))
        write_parquet(ckpts, tmp / "checkpoints.parquet")
        write_parquet(logs, tmp / "sft_log.parquet")
        parts = [f"{run_art.stage}/{run_art.step(k).key}" for k in cfg.sft.save_steps if k > 0]
        return {"steps": cfg.sft.save_steps, "parts": parts}

    path = STAGE.build(run_art, build)
    shutil.rmtree(run_art.work_dir, ignore_errors=True)
    return path
