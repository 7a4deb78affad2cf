"""Stage `pretrain`: give the embedded tiny model knowledge to lose (issue 11, docs/pretrain.md).

A randomly initialised model has no OOD ability for SFT to erode: the paper's base models
came with general knowledge. This stage trains the `model` stage's tiny model on a
synthetic corpus of full benchmark prompts whose face-card sentence states OTHER values
for J, Q and K (random per example, in varied wording), answered one third in the
benchmark's answer block (GP §5) and two thirds in a plain format. No example is a
GeneralPoints example under the ID rule (all 10) or the OOD rule (11, 12, 13): the rule
each example states, read back from its text, is neither, and its answer computes with
that stated rule (tested on 10,000 examples). Nor does the corpus deal any evaluation
hand's cards, under any rule (`data.overlap`, as for SFT hands).

Store: `pretrain/<key>/` is a standalone HF model directory like the model stage's, plus
`pretrain_log.parquet` (step, loss, lr). The base that the toy study uses is shipped in
`tasks/shipped/` with its content hash and the command that rebuilds it bit for bit;
`run` copies it when the config matches and `pretrain.use_shipped` is set, so `make demo`
does not pay the pretraining minutes.

The corpus is the task's (`Benchmark.corpus`; GeneralPoints: tasks/generalpoints/corpus.py);
this module trains on it and ships the result.

Rebuild the shipped base (the exact command is recorded in tasks/shipped/tiny-base.json):
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python -m tasks.pretrain configs/toy.yaml --ship
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import polars as pl
import torch
from prefect import task

from rlheal.caching import Stage, open_store
from rlheal.config import PretrainSection, StudyConfig, load_config
from rlheal.faults import maybe_fail
from rlheal.store import Artifact, Store, sha256_file, write_parquet
from tasks import benchmark, lm, model
from tasks.chat import prompt_completion_ids

STAGE = Stage("pretrain", version="1")
LOG = "pretrain_log.parquet"
SHIPPED = Path(__file__).parents[1] / "shipped"
# One shipped base per task, each with the toy config that rebuilds it.
SHIPPED_NAMES = {"generalpoints": "tiny-base", "virl": "tiny-base-virl"}
TOY_CONFIGS = {"generalpoints": "configs/toy.yaml", "virl": "configs/toy-virl.yaml"}
SHIPPED_NAME = SHIPPED_NAMES["generalpoints"]
REBUILD = "OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python -m tasks.pretrain {config} --ship"
log = logging.getLogger("rlheal.pretrain")

# ---------------------------------------------------------------------------- training


MIN_LR_RATIO = 0.1


def lr_factor(step: int, p: PretrainSection) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to MIN_LR_RATIO at the last step."""
    if step < p.warmup_steps:
        return (step + 1) / p.warmup_steps
    span = max(1, p.steps - p.warmup_steps)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * (step - p.warmup_steps) / span))


def tokenize(tok, table: pl.DataFrame) -> list[tuple[list[int], int]]:
    """(ids, prompt length) per example through the one chat renderer (GP §4): the corpus
    looks to the model exactly as SFT rows and evaluation prompts do."""
    return [
        prompt_completion_ids(tok, [{"role": "user", "content": p}], [{"role": "assistant", "content": a}], None)
        for p, a in zip(table["prompt"], table["answer"])
    ]


def collate(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on prompt and padding: the loss is
    on answers and end-of-turn only, as in SFT; the prompts' random face values are noise)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (seq, n_prompt) in enumerate(rows):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
    return ids, mask, labels


@contextlib.contextmanager
def one_thread():
    """Bit-for-bit results need one intra-op thread (reductions split across threads sum in
    another order); also the fast setting on a shared 2-core machine (issue 11)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(model, rows: list[tuple[list[int], int]], p: PretrainSection, pad_id: int, log_every: int = 25) -> list[dict]:
    """`p.steps` AdamW steps over the rows in order (wrapping around), fp32 on CPU; returns the log."""
    torch.manual_seed(p.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p.learning_rate, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, p))
    model.train()
    history, started, running = [], time.time(), []
    for step in range(p.steps):
        batch = [rows[(step * p.batch_size + j) % len(rows)] for j in range(p.batch_size)]
        ids, mask, labels = collate(batch, pad_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        running.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == p.steps:
            history.append({"step": step + 1, "loss": sum(running) / len(running), "learning_rate": lr})
            log.info("pretrain step %d/%d loss %.4f lr %.3g (%.1f steps/s)", step + 1, p.steps, history[-1]["loss"], lr, (step + 1) / (time.time() - started))
            running = []
    model.eval()
    return history


def pretrain(model_dir: Path, out: Path, cfg: StudyConfig) -> dict:
    """Train the tiny model at `model_dir` on the corpus; write an HF directory to `out`."""
    p = cfg.pretrain
    with one_thread():
        tok = lm.load_tokenizer(model_dir)
        model = lm.load_model(model_dir, torch.float32, "cpu")
        t0 = time.time()
        table = benchmark.of(cfg).corpus(cfg)
        rows = tokenize(tok, table)
        log.info("pretrain corpus: %d examples, %d answer tokens, built in %.1f s", len(rows), sum(len(r) - n for r, n in rows), time.time() - t0)
        history = train(model, rows, p, tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    write_parquet(pl.DataFrame(history, schema={"step": pl.Int32, "loss": pl.Float64, "learning_rate": pl.Float64}), out / LOG)
    return {"final_loss": history[-1]["loss"], "weights_sha256": lm.weights_hash(out)}


# ---------------------------------------------------------------------------- shipped base


def shipped_key(cfg: StudyConfig) -> dict:
    """Everything the trained weights depend on: this module's and the model stage's code
    versions, the tiny model's config, the pretraining config and the evaluation hands the
    corpus avoids (whether the shipped copy is used does not change the weights: the
    rebuild is bit for bit)."""
    return {
        "version": STAGE.version,
        "model_version": model.STAGE.version,
        "tiny": cfg.model.tiny.model_dump(),
        **key_config(cfg),
    }


def rebuild_command(task: str = "generalpoints") -> str:
    return REBUILD.format(config=TOY_CONFIGS[task])


def shipped_record(root: Path = SHIPPED, task: str = "generalpoints") -> dict | None:
    if task not in SHIPPED_NAMES:
        return None  # a task without a shipped base trains its own
    record = root / f"{SHIPPED_NAMES[task]}.json"
    return json.loads(record.read_text()) if record.is_file() else None


def shipped_problem(root: Path = SHIPPED, task: str = "generalpoints") -> str | None:
    """Why the shipped checkpoint cannot be used (None = its files match its recorded hashes)."""
    record = shipped_record(root, task)
    if record is None:
        return "no shipped record"
    folder = root / SHIPPED_NAMES[task]
    for name, digest in record["files"].items():
        if not (folder / name).is_file() or sha256_file(folder / name) != digest:
            return f"{folder / name} does not match its recorded sha256"
    if lm.weights_hash(folder) != record["weights_sha256"]:
        return "weights hash does not match the record"
    return None


def ship(cfg: StudyConfig, root: Path = SHIPPED) -> dict:
    """Train from scratch (never from the shipped copy) and write the checkpoint and its record."""
    cfg = cfg.model_copy(update={"pretrain": cfg.pretrain.model_copy(update={"use_shipped": False})})
    with tempfile.TemporaryDirectory(prefix="rlheal-ship-") as tmp:
        store = Store(tmp)
        model_dir = model.run(store, cfg)
        t0 = time.time()
        built = run(store, cfg, model_dir)
        seconds = time.time() - t0
        folder = root / SHIPPED_NAMES[cfg.task]
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for f in sorted(Path(built).iterdir()):
            if f.name != "manifest.json":
                shutil.copy2(f, folder / f.name)
        record = {
            "key": shipped_key(cfg),
            "start_weights_sha256": store.manifest(model_dir)["weights_sha256"],
            "weights_sha256": lm.weights_hash(folder),
            "files": {f.name: sha256_file(f) for f in sorted(folder.iterdir())},
            "final_loss": store.manifest(built)["final_loss"],
            "command": rebuild_command(cfg.task),
            "built_seconds": round(seconds, 1),
            "torch": torch.__version__,
        }
    (root / f"{SHIPPED_NAMES[cfg.task]}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def shipped_for(cfg: StudyConfig, start_hash: str) -> Path | None:
    """The shipped checkpoint directory if it was trained with this config from this start."""
    record = shipped_record(task=cfg.task)
    if record is None or record["key"] != json.loads(json.dumps(shipped_key(cfg))) or record["start_weights_sha256"] != start_hash:
        return None
    if why := shipped_problem(task=cfg.task):
        log.warning("shipped base not used: %s; training instead", why)
        return None
    return SHIPPED / SHIPPED_NAMES[cfg.task]


# ---------------------------------------------------------------------------- store and Prefect


def key_config(cfg: StudyConfig) -> dict:
    d = cfg.data
    return {
        "task": cfg.task,
        "corpus": benchmark.of(cfg).corpus_version,  # the corpus code: an edit to it is another base
        "pretrain": cfg.pretrain.model_dump(exclude={"enabled", "use_shipped"}),
        "exclude": {"eval_seed": d.eval_seed, "eval_size": d.eval_size, "overlap": d.overlap},
    }


def artifact(store: Store, cfg: StudyConfig, model_art: Artifact) -> Artifact:
    return STAGE.artifact(store, key_config(cfg), inputs=[model_art])


def run(store: Store, cfg: StudyConfig, model_dir: Path) -> Path:
    """Build (or find) the pretrained base; plain function, no Prefect needed."""
    return make(artifact(store, cfg, Store.from_path(model_dir)), cfg, Path(model_dir))


@task(name=STAGE.name, task_run_name="pretrain steps={cfg.pretrain.steps}")
def stage(artifact: Artifact, cfg: StudyConfig, model: str) -> str:
    maybe_fail("pretrain")
    return str(make(artifact, cfg, Path(model)))


def make(art: Artifact, cfg: StudyConfig, model_dir: Path) -> Path:
    """The pretrained base `art` of the model artifact `model_dir`: found sealed, or the
    shipped copy when it matches, or trained."""
    start_hash = open_store(art.root).manifest(model_dir)["weights_sha256"]

    def build(tmp: Path) -> dict:
        shipped = shipped_for(cfg, start_hash) if cfg.pretrain.use_shipped else None
        if shipped is not None:
            for f in sorted(shipped.iterdir()):
                shutil.copy2(f, tmp / f.name)
            log.info("pretrain: copied the shipped base %s", shipped)
            return {"source": "shipped", "weights_sha256": lm.weights_hash(tmp), "final_loss": shipped_record(task=cfg.task)["final_loss"]}
        if cfg.pretrain.use_shipped:
            log.info("pretrain: the shipped base was trained with another config; training (%d steps)", cfg.pretrain.steps)
        return {"source": "trained", **pretrain(model_dir, tmp, cfg)}

    return STAGE.build(art, build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.pretrain", description="Rebuild the shipped pretrained tiny base.")
    parser.add_argument("config", help="study YAML whose model.tiny and pretrain sections define the base")
    parser.add_argument("--ship", action="store_true", help=f"write the result into {SHIPPED} (else only compare with it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    cfg = load_config(args.config)
    if args.ship:
        record = ship(cfg)
        print(json.dumps({k: record[k] for k in ("weights_sha256", "final_loss", "built_seconds")}))
        return 0
    before = shipped_record(task=cfg.task)
    with tempfile.TemporaryDirectory(prefix="rlheal-check-") as tmp:
        record = ship(cfg, Path(tmp))
    same = before is not None and before["weights_sha256"] == record["weights_sha256"]
    print(f"rebuilt {record['weights_sha256']}; shipped {before and before['weights_sha256']}: {'identical' if same else 'DIFFERENT'}")
    return 0 if same else 1

