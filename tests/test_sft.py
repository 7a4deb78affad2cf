"""The model and SFT stages on the embedded tiny model: real TRL training, real checkpoints."""

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
from tasks import data, models, sft
from tasks.chat import render
from tasks.generalpoints import deal, failure_message, reference_answer, render_prompt
from tests.conftest import kill_when

SMALL = {
    "name": "t",
    "data": {"train_size": 96, "eval_size": 8, "multi_turn_fraction": 0.3},
    "sft": {"save_steps": [0, 2, 6], "batch_size": 16, "per_device_batch_size": 8, "learning_rate": 3e-3, "lr_schedule": "constant", "ce_every": 3},
    "eval": {"ce_hands": 8, "decoding": {"max_new_tokens": 16}},
    "rl": {"from_steps": []},  # the CLI tests here are about SFT
    "editing": {"enabled": False},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real SFT run shared by the tests below."""
    store = Store(tmp_path_factory.mktemp("store"))
    cfg = parse_config(SMALL)
    data_dir = data.run(store, cfg)
    model_dir = models.run(store, cfg)
    run_dir = sft.run(store, cfg, model_dir, data_dir)
    return store, cfg, Path(data_dir), Path(model_dir), Path(run_dir)


def test_tiny_tokenizer_round_trips_through_from_pretrained(tiny_run):
    _, _, _, model_dir, _ = tiny_run
    tok = models.load_tokenizer(model_dir)
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
    models.build_tiny(a, cfg.model), models.build_tiny(b, cfg.model)
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    k_proj = wa["model.layers.0.self_attn.k_proj.weight"]
    assert k_proj.shape[0] < k_proj.shape[1]  # non-square, as in real GQA models
    assert (a / "config.json").exists() and (a / "generation_config.json").exists() and (a / "tokenizer.json").exists()


def test_labels_are_exactly_the_answer_and_end_of_turn(tiny_run, tmp_path):
    from trl import SFTTrainer

    _, cfg, data_dir, model_dir, _ = tiny_run
    tok = models.load_tokenizer(model_dir)
    rows = pl.read_parquet(data_dir / "sft_train.parquet")
    ds = sft.tokenized_rows(tok, rows, 16, cfg.chat.date_string)
    trainer = SFTTrainer(model=models.load_model(model_dir), args=sft.trainer_args(cfg, tmp_path, False), train_dataset=ds, processing_class=tok)
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
        assert models.load_model(path) is not None
    assert ckpts["content_hash"].n_unique() == 3
    log = pl.read_parquet(run_dir / "sft_log.parquet")
    losses = log.drop_nulls("train_loss")
    assert losses["step"].to_list() == [1, 2, 3, 4, 5, 6]
    assert losses["train_loss"][-1] < losses["train_loss"][0]
    ce = log.drop_nulls("ce_ood")
    assert ce["step"].to_list() == [0, 3, 6] and ce["ce_id"][-1] < ce["ce_id"][0]
    assert not sft.work_dir(Store.from_path(run_dir)).exists()  # resume state dropped once sealed


def test_rerun_is_a_cache_hit(tiny_run):
    store, cfg, data_dir, model_dir, run_dir = tiny_run
    before = (run_dir / "manifest.json").stat().st_mtime_ns
    assert Path(sft.run(store, cfg, model_dir, data_dir)) == run_dir
    assert (run_dir / "manifest.json").stat().st_mtime_ns == before


def test_lora_checkpoints_are_merged_full_weights(tmp_path):
    store = Store(tmp_path)
    cfg = parse_config({**SMALL, "sft": {**SMALL["sft"], "lora": True, "lora_r": 4, "lora_alpha": 8, "save_steps": [0, 2], "learning_rate": 1e-2}})
    data_dir, model_dir = data.run(store, cfg), models.run(store, cfg)
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
    cfg = parse_config({**SMALL, "sft": {**SMALL["sft"], "lora": True, "lora_targets": ["attention.wq"]}})
    with pytest.raises(ValueError, match=r"sft.lora_targets: none of \['attention.wq'\]"):
        sft.run(store, cfg, models.run(store, cfg), data.run(store, cfg))


def test_lr_schedules_match_the_authors():
    s = parse_config({"name": "t"}).sft  # log warm-up over 376 steps, lr 1e-6
    lrs = [1e-6 * sft.lr_factor(k, s) for k in range(376)]
    assert lrs[0] == 0 and abs(lrs[1] - 1.169e-7) < 1e-10 and abs(lrs[2] - 1.853e-7) < 1e-10 and abs(lrs[374] - 9.9955e-7) < 1e-10
    assert sft.lr_factor(375, s) == 1.0 and sft.lr_factor(1000, s) == 1.0


def test_unknown_model_is_a_clear_error_before_training(tmp_path):
    cfg = parse_config({"name": "t", "model": {"name_or_path": "no-such-org/no-such-model"}})
    with pytest.raises(ConfigError, match="model.name_or_path: 'no-such-org/no-such-model' is neither a directory nor a model in the local"):
        models.run(Store(tmp_path), cfg)


def test_a_local_hf_directory_is_used_in_place(tiny_run, tmp_path):
    _, _, _, model_dir, _ = tiny_run
    cfg = parse_config({"name": "t", "model": {"name_or_path": str(model_dir)}})
    art = models.run(Store(tmp_path), cfg)
    assert models.model_dir(art) == model_dir


def _uninterrupted_final(tmp_path, cfg_dict):
    store = Store(tmp_path / "reference")
    cfg = parse_config(cfg_dict)
    run_dir = sft.run(store, cfg, models.run(store, cfg), data.run(store, cfg))
    path = pl.read_parquet(Path(run_dir) / "checkpoints.parquet")["path"][-1]
    return load_file(Path(path) / "model.safetensors")


def test_kill_9_mid_sft_then_resume(cli_env, tmp_path):
    """A real `kill -9` of `rlheal run` after the first checkpoint; the re-run resumes
    from the trainer state and ends where an uninterrupted run ends."""
    cfg_dict = {**SMALL, "data": {"train_size": 640, "eval_size": 8}, "sft": {**SMALL["sft"], "save_steps": [0, 3, 40], "ce_every": 1000}}
    cfg_file = tmp_path / "resume.yaml"
    cfg_file.write_text(yaml.safe_dump({**cfg_dict, "store": str(tmp_path / "store")}))
    cmd = [sys.executable, "-m", "rlheal.cli", "run", str(cfg_file)]
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    kill_when(proc, lambda: any((tmp_path / "store" / "sft").glob("*-s3/manifest.json")), "its first checkpoint")
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
    r = subprocess.run([sys.executable, "-m", "rlheal.cli", "run", str(cfg_file)], env=cli_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "model.name_or_path" in r.stderr
    assert not (tmp_path / "store").exists()
