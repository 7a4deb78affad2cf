"""The model and SFT stages on the embedded tiny model: real TRL training, real checkpoints."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rlheal.config import ConfigError, parse_config
from rlheal.store import Store
from tasks import data, lm, model, sft
from tasks.chat import prompt_completion_ids, render
from tasks.generalpoints import deal, failure_message, reference_answer, render_prompt
from tests.conftest import kill_when

SMALL = {
    "name": "t",
    "data": {"train_size": 96, "eval_size": 8, "multi_turn_fraction": 0.3},
    "sft": {"save_steps": [0, 2, 6], "batch_size": 16, "per_device_batch_size": 8, "learning_rate": 3e-3, "lr_schedule": "constant", "ce_every": 3},
    "eval": {"ce_hands": 8, "decoding": {"max_new_tokens": 16}},
    "rl": {"from_steps": []},  # the CLI tests here are about SFT
    "edit": {"enabled": False},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real SFT run shared by the tests below."""
    store = Store(tmp_path_factory.mktemp("store"))
    cfg = parse_config(SMALL)
    data_dir = data.run(store, cfg)
    model_dir = model.run(store, cfg)
    run_dir = sft.run(store, cfg, model_dir, data_dir)
    return store, cfg, Path(data_dir), Path(model_dir), Path(run_dir)


def test_tiny_tokenizer_round_trips_through_from_pretrained(tiny_run):
    _, _, _, model_dir, _ = tiny_run
    tok = lm.load_tokenizer(model_dir)
    assert type(tok).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    texts = []
    for split in ("id", "ood"):
        for i in range(20):
            hand = deal(split, 3, i)
            texts += [render_prompt(hand), reference_answer(hand)]
    texts += [failure_message("you used invalid numbers: [11], you didn't use numbers: [10]."), failure_message("(4*6*1 is partially correct but the full formula does not match any solution.")]
    for text in texts:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
        assert tok.unk_token_id not in tok(text)["input_ids"]
    convo = [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}]
    rendered = render(tok, convo, add_generation_prompt=False)
    assert tok.decode(tok(rendered, add_special_tokens=False)["input_ids"]) == rendered
    # whole card values are single tokens; prompts are short
    assert len(tok("10")["input_ids"]) == 1 and len(tok("24")["input_ids"]) == 1
    assert len(tok(texts[0])["input_ids"]) < 120


def test_tiny_model_is_gqa_and_deterministic(tmp_path):
    cfg = parse_config({"name": "t"})
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    model.build_tiny(a, cfg), model.build_tiny(b, cfg)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    k_proj = wa["model.layers.0.self_attn.k_proj.weight"]
    assert k_proj.shape[0] < k_proj.shape[1]  # non-square, as in real GQA models
    assert (a / "config.json").exists() and (a / "generation_config.json").exists() and (a / "tokenizer.json").exists()


def test_labels_are_exactly_the_answer_and_end_of_turn(tiny_run, tmp_path):
    from trl import SFTTrainer

    _, cfg, data_dir, model_dir, _ = tiny_run
    tok = lm.load_tokenizer(model_dir)
    rows = pl.read_parquet(data_dir / "sft_train.parquet")
    ds = sft.tokenized_rows(tok, rows, 16, cfg.chat.date_string)
    trainer = SFTTrainer(model=lm.load_model(model_dir), args=sft.trainer_args(cfg, tmp_path, "cpu"), train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))  # the collated batch the trainer sees
    assert batch["input_ids"].shape[0] == 8
    for i in range(8):
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert tok.decode(labelled) == rows["completion"][i][0]["content"] + "<|end|>"
    # the multi-turn rows carry the wrong attempt and its failure message in the prompt
    multi = rows.filter(pl.col("multi_turn"))
    assert multi.height > 0 and multi["prompt"][0][2]["content"].startswith("You failed this trial because ")


def test_smoke_sft_lowers_loss_and_writes_every_checkpoint(tiny_run):
    store, cfg, _, model_dir, run_dir = tiny_run
    ckpts = pl.read_parquet(run_dir / "checkpoints.parquet")
    assert ckpts["step"].to_list() == [0, 2, 6]
    assert ckpts["ckpt_id"].to_list() == ["base", "sft-2", "sft-6"]
    assert ckpts["path"][0] == str(model_dir)  # step 0 is registered, not copied
    for path in ckpts["path"][1:]:
        assert store.is_sealed(Path(path))
        assert lm.load_model(path) is not None
    assert ckpts["content_hash"].n_unique() == 3
    log = pl.read_parquet(run_dir / "sft_log.parquet")
    losses = log.drop_nulls("train_loss")
    assert losses["step"].to_list() == [1, 2, 3, 4, 5, 6]
    assert losses["train_loss"][-1] < losses["train_loss"][0]
    ce = log.drop_nulls("ce_ood")
    assert ce["step"].to_list() == [0, 3, 6] and ce["ce_id"][-1] < ce["ce_id"][0]
    assert not Store.from_path(run_dir).work_dir.exists()  # resume state dropped once sealed


def test_a_sealed_checkpoints_row_is_the_runs_own_with_its_hash_from_the_manifest(tiny_run):
    """The streaming flow builds each checkpoint's row as SFT seals it, its content hash
    from the manifest's sha256s (not a second read of the weights): the same row the run's
    `checkpoints` table holds, and a change to a weight file's recorded digest changes it."""
    store, _, _, _, run_dir = tiny_run
    run = Store.from_path(run_dir)
    table = {r["ckpt_id"]: r for r in pl.read_parquet(run_dir / "checkpoints.parquet").to_dicts()}
    for step in (2, 6):
        row = sft.checkpoint_row(store, run, step)
        assert row == {k: table[f"sft-{step}"][k] for k in row}, step
        assert row["content_hash"] == lm.weights_hash(Path(row["path"]))
    files = store.manifest(run.step(6))["files"]
    digests = {rel: f["sha256"] for rel, f in files.items()}
    weights = next(rel for rel in digests if rel.endswith(".safetensors"))
    assert lm.weights_hash_of(digests | {"config.json": "0" * 64}) == lm.weights_hash_of(digests)  # weights only
    assert lm.weights_hash_of(digests | {weights: "0" * 64}) != lm.weights_hash_of(digests)


def test_rerun_is_a_cache_hit(tiny_run):
    store, cfg, data_dir, model_dir, run_dir = tiny_run
    before = (run_dir / "manifest.json").stat().st_mtime_ns
    assert Path(sft.run(store, cfg, model_dir, data_dir)) == run_dir
    assert (run_dir / "manifest.json").stat().st_mtime_ns == before


def test_lora_checkpoints_are_merged_full_weights(tmp_path):
    store = Store(tmp_path)
    cfg = parse_config({**SMALL, "sft": {**SMALL["sft"], "lora": {"enabled": True, "r": 4, "alpha": 8}, "save_steps": [0, 2], "learning_rate": 1e-2}})
    data_dir, model_dir = data.run(store, cfg), model.run(store, cfg)
    run_dir = sft.run(store, cfg, model_dir, data_dir)
    ckpt = pl.read_parquet(Path(run_dir) / "checkpoints.parquet").filter(pl.col("step") == 2)["path"][0]
    files = sorted(p.name for p in Path(ckpt).iterdir())
    assert "model.safetensors" in files and "adapter_model.safetensors" not in files
    base, merged = load_file(Path(model_dir) / "model.safetensors"), load_file(Path(ckpt) / "model.safetensors")
    assert set(base) == set(merged)
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("proj" in k for k in changed)


def test_lora_merge_equals_base_plus_scaled_update():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj"], lora_dropout=0.0))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    expected = base["model.layers.0.self_attn.q_proj.weight"] + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * (6 / 2)
    merged = sft.merged_copy(peft).state_dict()
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged["model.layers.0.self_attn.k_proj.weight"], base["model.layers.0.self_attn.k_proj.weight"], rtol=0, atol=0)


def test_lora_targets_that_match_nothing_are_an_error(tmp_path):
    store = Store(tmp_path)
    cfg = parse_config({**SMALL, "sft": {**SMALL["sft"], "lora": {"enabled": True, "targets": ["attention.wq"]}}})
    with pytest.raises(ValueError, match=r"sft.lora.targets: none of \['attention.wq'\]"):
        sft.run(store, cfg, model.run(store, cfg), data.run(store, cfg))


def test_lr_schedules_match_the_authors():
    s = parse_config({"name": "t"}).sft  # log warm-up over 376 steps, lr 1e-6
    lrs = [1e-6 * sft.lr_factor(k, s) for k in range(376)]
    assert lrs[0] == 0 and abs(lrs[1] - 1.169e-7) < 1e-10 and abs(lrs[2] - 1.853e-7) < 1e-10 and abs(lrs[374] - 9.9955e-7) < 1e-10
    assert sft.lr_factor(375, s) == 1.0 and sft.lr_factor(1000, s) == 1.0


def test_unknown_model_is_a_clear_error_before_training(tmp_path):
    cfg = parse_config({"name": "t", "model": {"name_or_path": "no-such-org/no-such-model"}})
    with pytest.raises(ConfigError, match="model.name_or_path: 'no-such-org/no-such-model' is neither a directory nor a model in the local"):
        model.run(Store(tmp_path), cfg)


def test_a_local_hf_directory_is_used_in_place(tiny_run, tmp_path):
    _, _, _, model_dir, _ = tiny_run
    cfg = parse_config({"name": "t", "model": {"name_or_path": str(model_dir)}})
    art = model.run(Store(tmp_path), cfg)
    assert model.model_dir(art) == model_dir


def _uninterrupted_final(tmp_path, cfg_dict):
    store = Store(tmp_path / "reference")
    cfg = parse_config(cfg_dict)
    run_dir = sft.run(store, cfg, model.run(store, cfg), data.run(store, cfg))
    path = pl.read_parquet(Path(run_dir) / "checkpoints.parquet")["path"][-1]
    return load_file(Path(path) / "model.safetensors")


def test_kill_9_mid_sft_then_resume(cli_env, tmp_path):
    """A real `kill -9` of `rlheal run` after the first checkpoint; the re-run resumes
    from the trainer state and ends where an uninterrupted run ends."""
    cfg_dict = {**SMALL, "data": {"train_size": 640, "eval_size": 8}, "sft": {**SMALL["sft"], "save_steps": [0, 3, 40], "ce_every": 1000}}
    cfg_file = tmp_path / "resume.yaml"
    cfg_file.write_text(yaml.safe_dump({**cfg_dict, "store": str(tmp_path / "store")}))
    cmd = [sys.executable, "-m", "flows.cli", "run", str(cfg_file), "-v"]  # -v: the resume's log line
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    # the resume point (the trainer state, marked complete) is written after the step's sealed
    # checkpoint: waiting for the checkpoint alone could kill before anything was resumable
    kill_when(proc, lambda: any((tmp_path / "store" / "sft").glob(f".work/*/checkpoint-3/{sft.DONE}")), "its first resume point")
    assert not list((tmp_path / "store" / "sft").glob("*-s40"))  # killed mid-run

    second = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "sft resumes from" in second.stdout + second.stderr
    final = load_file(next((tmp_path / "store" / "sft").glob("*-s40")) / "model.safetensors")
    reference = _uninterrupted_final(tmp_path, cfg_dict)
    for k in reference:
        torch.testing.assert_close(final[k], reference[k], rtol=1e-4, atol=1e-5)


def test_cli_with_missing_model_exits_2_before_training(cli_env, tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump({**SMALL, "store": str(tmp_path / "store"), "model": {"name_or_path": str(tmp_path / "nowhere")}}))
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(cfg_file)], env=cli_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "model.name_or_path" in r.stderr
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------------------- precision (issue 14 §3)


def test_training_precision_is_fp32_weights_everywhere_with_bf16_autocast_on_cuda():
    assert sft.training_precision("cuda") == (torch.float32, torch.bfloat16)
    assert sft.training_precision(torch.device("cuda", 1)) == (torch.float32, torch.bfloat16)
    assert sft.training_precision("cpu") == (torch.float32, None)


class _Built(Exception):
    """Raised by the stand-in SFTTrainer: train() got as far as handing TRL its model."""


def test_sft_on_cuda_trains_fp32_weights_under_trls_bf16_mixed_precision(tiny_run, tmp_path, monkeypatch):
    """What train() would do on a GPU, run on a CPU: the real model is loaded (on the CPU,
    in the dtype train() asks for) and everything train() does to it up to the trainer
    runs; a stand-in SFTTrainer then records the parameters the optimizer and the trainer
    actually receive, and the SFTConfig (whose bf16 flag is accelerate's autocast)."""
    import transformers.training_args
    import trl

    _, cfg, data_dir, model_dir, _ = tiny_run
    real_load, real_args, real_cuda = sft.lm.load_model, sft.trainer_args, torch.cuda.is_available
    loads, seen = [], {}

    def load_on_cpu(path, dtype=torch.float32, device="cpu", trust_remote_code=False):
        loads.append((dtype, str(device)))
        return real_load(path, dtype, "cpu", trust_remote_code)

    def args_for(cfg, out, device):  # the real SFTConfig for `device`; building it looks for a GPU
        seen["device"] = str(device)
        with monkeypatch.context() as m:
            m.setattr(torch.cuda, "is_available", real_cuda)
            return real_args(cfg, out, device)

    class Trainer:
        def __init__(self, model=None, args=None, optimizers=(None, None), **kw):
            opt, _ = optimizers
            seen["model"] = {p.dtype for p in model.parameters()}
            seen["optimizer"] = {p.dtype for g in opt.param_groups for p in g["params"]}
            seen["n_optimized"] = sum(p.numel() for g in opt.param_groups for p in g["params"])
            seen["n_model"] = sum(p.numel() for p in model.parameters())
            seen["args"] = (args.bf16, args.fp16, args.mixed_precision, args.use_cpu)
            raise _Built

    store = Store(tmp_path / "store")
    run = sft.artifact(store, cfg, Store.from_path(model_dir), Store.from_path(data_dir))
    with monkeypatch.context() as m, pytest.raises(_Built):
        m.setattr(sft.torch.cuda, "is_available", lambda: True)
        m.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: True)
        m.setattr(sft.lm, "load_model", load_on_cpu)
        m.setattr(sft, "trainer_args", args_for)
        m.setattr(trl, "SFTTrainer", Trainer)
        sft.train(store, run, cfg, model_dir, data_dir)
    assert loads == [(torch.float32, "cuda")] and seen["device"] == "cuda"  # fp32 master weights, not bf16 ones
    # what the optimizer updates and the trainer trains: every parameter, all float32
    assert seen["model"] == seen["optimizer"] == {torch.float32}, seen
    assert seen["n_optimized"] == seen["n_model"] > 0
    # with bf16 autocast over them (accelerate's mixed precision), not fp16, not the CPU
    assert seen["args"] == (True, False, "bf16", False)
    assert not sft.trainer_args(cfg, tmp_path, "cpu").bf16


def test_checkpoints_are_saved_in_the_configured_dtype(tiny_run, tmp_path):
    """sft.save_dtype: bfloat16 rounds the fp32 weights at save time, and only then: the
    step-2 checkpoint equals the float32 run's step-2 weights rounded to bf16."""
    _, cfg, data_dir, model_dir, run_dir = tiny_run
    assert cfg.sft.save_dtype == "float32" and sft.save_dtype(cfg.sft, model_dir) == torch.float32
    store = Store(tmp_path)
    bf16 = parse_config({**SMALL, "sft": {**SMALL["sft"], "save_steps": [0, 2], "save_dtype": "bfloat16"}})
    ckpts = pl.read_parquet(Path(sft.run(store, bf16, model_dir, data_dir)) / "checkpoints.parquet")
    saved = Path(ckpts.filter(pl.col("step") == 2)["path"][0])
    fp32 = load_file(Path(pl.read_parquet(run_dir / "checkpoints.parquet").filter(pl.col("step") == 2)["path"][0]) / "model.safetensors")
    rounded = load_file(saved / "model.safetensors")
    assert set(rounded) == set(fp32) and {t.dtype for t in rounded.values()} == {torch.bfloat16}
    for k in fp32:
        torch.testing.assert_close(rounded[k], fp32[k].to(torch.bfloat16), rtol=0, atol=0)
    assert json.loads((saved / "config.json").read_text())["dtype"] == "bfloat16"
    assert lm.load_model(saved, dtype="auto").dtype == torch.bfloat16
    # auto: the starting model's stored dtype
    auto = parse_config({**SMALL, "sft": {**SMALL["sft"], "save_dtype": "auto"}}).sft
    assert sft.save_dtype(auto, model_dir) == torch.float32
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    assert sft.save_dtype(auto, tmp_path / "hub") == torch.bfloat16


def test_save_dtype_auto_reads_the_dtype_key_transformers_5_writes(tiny_run, tmp_path):
    """sft.save_dtype: auto from a starting model whose config.json says `"dtype": "bfloat16"`
    (what transformers 5 writes; no `torch_dtype`): the checkpoints are bf16, not the
    float32 fallback (which the tiny model's own float32 would not tell apart)."""
    _, _, _, model_dir, _ = tiny_run
    start = tmp_path / "bf16-model"
    shutil.copytree(model_dir, start)
    sft.cast_checkpoint(start, torch.bfloat16)
    config = json.loads((start / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    assert {t.dtype for t in load_file(start / "model.safetensors").values()} == {torch.bfloat16}
    store = Store(tmp_path / "store")
    cfg = parse_config({**SMALL, "model": {"name_or_path": str(start)}, "sft": {**SMALL["sft"], "save_steps": [0, 2], "save_dtype": "auto", "ce_every": 1000}})
    assert sft.save_dtype(cfg.sft, start) == torch.bfloat16
    ckpts = pl.read_parquet(Path(sft.run(store, cfg, model.run(store, cfg), data.run(store, cfg))) / "checkpoints.parquet")
    saved = Path(ckpts.filter(pl.col("step") == 2)["path"][0])
    assert {t.dtype for t in load_file(saved / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((saved / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_sft_step_at_lr_1e6_on_cuda_changes_the_weights(tmp_path):
    """At the authors' lr an Adam step moves a weight by ~1e-6, 60x less than half a bf16
    ulp of a weight of 0.02: with bf16 weights only the ~1 % of elements smaller than
    ~2.5e-4 could change. With fp32 master weights every element with a gradient moves,
    by about lr (Adam's first step is lr * g / (|g| + eps), |g| >> eps = 1e-7 here)."""
    store = Store(tmp_path)
    cfg = parse_config({**SMALL, "sft": {**SMALL["sft"], "save_steps": [0, 1], "learning_rate": 1e-6, "lr_schedule": "constant", "ce_every": 1000}})
    run_dir = sft.run(store, cfg, model.run(store, cfg), data.run(store, cfg))
    ckpts = pl.read_parquet(Path(run_dir) / "checkpoints.parquet")
    base = load_file(Path(ckpts["path"][0]) / "model.safetensors")
    step = load_file(Path(ckpts["path"][1]) / "model.safetensors")
    assert {t.dtype for t in step.values()} == {torch.float32}
    delta = torch.cat([(step[k] - base[k]).abs().flatten() for k in base])
    changed = delta[delta > 0]
    assert changed.numel() / delta.numel() > 0.9, f"only {changed.numel() / delta.numel():.1%} of the weights moved"
    assert 0.5e-6 < changed.median().item() < 1.5e-6


# ---------------------------------------------------------------------------- one source for the optimizer (issue 14 §7)


def test_the_optimizer_takes_its_hyperparameters_from_the_trainer_args(tiny_run, tmp_path):
    """The SFTConfig is the one holder of lr, betas, eps and weight decay: change one there
    and the optimizer follows (an optimizer built from the sft section would not)."""
    _, cfg, _, model_dir, _ = tiny_run
    args = sft.trainer_args(cfg, tmp_path, "cpu")
    s = cfg.sft
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.weight_decay) == (s.learning_rate, s.adam_beta1, s.adam_beta2, s.adam_epsilon, s.weight_decay)
    args.learning_rate, args.adam_beta1, args.adam_beta2, args.adam_epsilon, args.weight_decay = 7e-4, 0.5, 0.75, 1e-3, 0.125
    opt, sched = sft.make_optimizer(lm.load_model(model_dir), args, s)
    group = opt.param_groups[0]
    assert (group["initial_lr"], group["betas"], group["eps"], group["weight_decay"]) == (7e-4, (0.5, 0.75), 1e-3, 0.125)
    assert sched.get_last_lr() == [7e-4 * sft.lr_factor(0, s)]


# ---------------------------------------------------------------------------- the logged learning rate (issue 14 §8)

# training.md §2.2, written out again here rather than calling sft.lr_factor: the factor
# of the lr at 0-based optimizer step s, warm-up W, run length T.
SPEC_SCHEDULES = {
    "log_warmup_constant": lambda s, W, T: min(1.0, math.log(s + 1) / math.log(W)),
    "linear_warmup_constant": lambda s, W, T: min(1.0, s / W),
    "cosine": lambda s, W, T: s / W if s < W else 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W))),
    "constant": lambda s, W, T: 1.0,
}


@pytest.fixture(scope="module")
def first_answer_runs(tmp_path_factory):
    """Short real SFT runs on data with `data.answer: first`, one per schedule with a
    warm-up (`constant` is tiny_run's): 8 optimizer steps of 2 accumulated micro-batches,
    warm-up 5 (3 for cosine, whose decay then shows). About 3.5 s each."""
    store = Store(tmp_path_factory.mktemp("schedules"))
    runs = {}
    for schedule in ("log_warmup_constant", "linear_warmup_constant", "cosine"):
        warmup = 3 if schedule == "cosine" else 5
        cfg = parse_config({
            **SMALL,
            "data": {"train_size": 128, "eval_size": 8, "answer": "first"},
            "sft": {**SMALL["sft"], "save_steps": [0, 8], "learning_rate": 1e-3, "lr_schedule": schedule, "warmup_steps": warmup, "ce_every": 1000, "log_every": 2 if schedule == "cosine" else 1},
        })  # fmt: skip
        data_dir, model_dir = data.run(store, cfg), model.run(store, cfg)
        runs[schedule] = (cfg, Path(data_dir), Path(model_dir), Path(sft.run(store, cfg, model_dir, data_dir)))
    return runs


@pytest.mark.parametrize("schedule", list(SPEC_SCHEDULES))
def test_every_logged_learning_rate_follows_the_schedule(first_answer_runs, tiny_run, schedule):
    """The trainer logs at global_step g (after g optimizer steps) the lr that step g - 1
    (0-based) used, so row g of sft_log must hold lr * factor(g - 1). Checked at every
    logged step; with log_every 2 (cosine) only even steps are logged, still of step g - 1."""
    cfg, run_dir = (tiny_run[1], tiny_run[4]) if schedule == "constant" else (first_answer_runs[schedule][0], first_answer_runs[schedule][3])
    s = cfg.sft
    logged = pl.read_parquet(run_dir / "sft_log.parquet").drop_nulls("learning_rate")
    expected_steps = list(range(s.log_every, s.max_steps + 1, s.log_every))
    assert logged["step"].to_list() == expected_steps
    want = [s.learning_rate * SPEC_SCHEDULES[schedule](g - 1, s.warmup_steps, s.max_steps) for g in expected_steps]
    assert logged["learning_rate"].to_list() == pytest.approx(want, rel=1e-12, abs=1e-18)
    if schedule != "constant":  # the values differ step to step, so a shifted index would fail
        assert len(set(want)) >= 3


from tests.test_eval import _labels_nll  # noqa: E402  (one independent CE_h for both files)
from tests.conftest import GP


def test_sft_log_ce_scores_the_trained_target(first_answer_runs):
    """With data.answer: first, sft_log's CE is that of the first-solution answers SFT trains
    on (ce_target "first"), not of the dealt references; step 0 is the base model itself."""
    cfg, data_dir, model_dir, run_dir = first_answer_runs["log_warmup_constant"]
    log = pl.read_parquet(run_dir / "sft_log.parquet")
    tok, base = lm.load_tokenizer(model_dir), lm.load_model(model_dir)
    table = pl.read_parquet(data_dir / "eval_set_ood.parquet")
    hands = [deal("ood", cfg.data.eval_seed, i) for i in range(cfg.eval.ce_hands)]
    trained = [GP.sft_row(h, cfg)["completion"][0]["content"] for h in hands]
    first = [_labels_nll(base, tok, p, a, cfg.chat.date_string) for p, a in zip(table["prompt"], trained)]
    dealt = [_labels_nll(base, tok, p, a, cfg.chat.date_string) for p, a in zip(table["prompt"], table["answer"])]
    ce0 = log.filter(pl.col("step") == 0)["ce_ood"][0]
    assert ce0 == pytest.approx(sum(first) / len(first), rel=1e-6)
    # 7 of these 8 hands' first solution is not the dealt one; the two CEs differed by
    # 4.0e-3 when measured (per hand up to 1.7e-2), 70x the tolerance above
    assert sum(h.solutions[0] != h.reference for h in hands) >= 4
    assert abs(sum(dealt) / len(dealt) - ce0) > 1e-3
    assert log["ce_target"].unique().to_list() == ["first"]
