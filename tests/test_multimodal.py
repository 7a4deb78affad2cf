"""A Mllama (Llama 3.2 Vision) checkpoint, as in configs/paper-llama3.2-11b.yaml, on a tiny
scale: loaded text-only with its real weights, generating on left-padded batches, fine-tuned
by the SFT stage, read by the SVD matrix selection with the same names at every step, and
edited under the authors' quirks like the Llama the authors edited."""

import json
import os
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import MllamaConfig, MllamaForCausalLM, MllamaForConditionalGeneration

from rlheal.config import SvdSection, parse_config
from rlheal.store import Store
from tasks import data, edit, lm, model, sft
from tasks.lm import ModelGenerator
from tasks.generalpoints import deal, failure_message, reference_answer, render_prompt
from tasks.svd.matrices import MULTIMODAL, check_same_matrices, read_tensor, select_matrices
from tests.conftest import GP

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # conftest sets it too; never reach the hub

CROSS_LAYER = 1  # the text model's cross-attention layer (11B: 3, 8, ..., 38)
N_LAYERS = 3
MODULES = {"self_attn": ("q", "k", "v", "o"), "cross_attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


def build_tiny_mllama(out: Path) -> Path:
    """A vision + text Mllama saved the way the hub stores Llama-3.2-11B-Vision:
    `language_model.model.layers.N…`, `language_model.lm_head.weight`, `vision_model…`,
    `multi_modal_projector…`; the text vocabulary is the project's tiny tokenizer."""
    tok = model.build_tokenizer(GP)
    config = MllamaConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
            num_key_value_heads=2, cross_attention_layers=[CROSS_LAYER], max_position_embeddings=512,
            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=4,
            vision_output_dim=64, image_size=28, patch_size=14, max_num_tiles=1, intermediate_layers_indices=[0],
            supported_aspect_ratios=[[1, 1]],
        ),
        image_token_index=len(tok),  # as in the real model: the first of the 8 extra embedding rows
    )  # fmt: skip
    torch.manual_seed(0)
    MllamaForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(f)
    return out


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def mllama(tmp_path_factory) -> Path:
    return build_tiny_mllama(tmp_path_factory.mktemp("mllama"))


@pytest.fixture(scope="module")
def pipeline(mllama, tmp_path_factory):
    """The model and SFT stages on the tiny Mllama (two real TRL steps)."""
    cfg = parse_config({
        "name": "mm", "model": {"name_or_path": str(mllama)},
        "data": {"train_size": 32, "eval_size": 8, "multi_turn_fraction": 0.3},
        "sft": {"save_steps": [0, 2], "batch_size": 8, "per_device_batch_size": 8, "learning_rate": 3e-3, "lr_schedule": "constant", "ce_every": 2},
        "eval": {"ce_hands": 4, "decoding": {"max_new_tokens": 8}}, "rl": {"from_steps": []}, "edit": {"enabled": False},
    })  # fmt: skip
    store = Store(tmp_path_factory.mktemp("store"))
    data_dir = data.run(store, cfg)
    model_dir = model.run(store, cfg)
    run_dir = sft.run(store, cfg, model_dir, data_dir)
    ckpts = pl.read_parquet(Path(run_dir) / "checkpoints.parquet")
    paths = dict(zip(ckpts["ckpt_id"], ckpts["path"]))
    return cfg, Path(model_dir), Path(paths["base"]), Path(paths["sft-2"])


def test_loads_the_language_model_with_the_saved_weights(mllama):
    files = saved_tensors(mllama)
    model = lm.load_model(mllama)
    assert type(model) is MllamaForCausalLM
    loaded = model.state_dict()
    # In memory `model.layers.N…` / `lm_head.weight`; on the hub both sit under `language_model.`.
    text = {n for n in files if n.startswith("language_model.")}
    assert {f"language_model.{n}" for n in loaded} == text
    assert len(text) < len(files) and not any(MULTIMODAL.fullmatch(n) for n in loaded)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, files[f"language_model.{name}"]), f"{name} was not loaded from the checkpoint"
    # Mllama keeps 8 extra input-embedding rows (the image token) beyond the head's vocabulary.
    assert loaded["model.embed_tokens.weight"].shape[0] == loaded["lm_head.weight"].shape[0] + 8
    # TRL's fused LM head reads hidden states from `base_model`: it must be the backbone.
    assert model.base_model is model.model


def test_generate_on_a_left_padded_batch(mllama):
    tok = lm.load_tokenizer(mllama)
    model = lm.load_model(mllama).eval()
    gen = ModelGenerator(model, tok, {"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": 8}, None)
    hand, other = deal("id", 0, 0), deal("ood", 0, 1)
    convos = [
        [{"role": "user", "content": render_prompt(hand)}],
        [
            {"role": "user", "content": render_prompt(other)},
            {"role": "assistant", "content": reference_answer(other)},
            {"role": "user", "content": failure_message("your formula does not match any solution.")},
        ],
    ]
    assert gen.length(convos[0]) < gen.length(convos[1])  # the first row is left-padded
    batch = gen(convos)
    alone = [gen([c])[0] for c in convos]
    assert batch == alone  # text, token count and stop reason of each row, padded or not


def test_select_matrices_takes_the_text_model_only(mllama):
    index = saved_tensors(mllama)
    mats = select_matrices(mllama, SvdSection())
    names = [m.param for m in mats]
    # The vision tower's own `layers.N.self_attn.q_proj` names match the include pattern: they
    # exist, and the built-in exclusion keeps them out.
    assert any(n.startswith("vision_model.") and n.endswith("self_attn.q_proj.weight") for n in index)
    assert all(n.startswith("language_model.model.layers.") for n in names)
    assert all(index[n].ndim == 2 for n in names)
    expected = [
        f"language_model.model.layers.{i}.{block}.{mod}_proj.weight"
        for i in range(N_LAYERS)
        for block in (("cross_attn", "mlp") if i == CROSS_LAYER else ("self_attn", "mlp"))
        for mod in MODULES[block]
    ]
    assert names == expected  # model order; the cross-attention layer's q/k/v/o and mlp included
    cross = [m for m in mats if m.block == "cross_attn"]
    assert [(m.layer, m.module) for m in cross] == [(CROSS_LAYER, x) for x in "qkvo"]
    assert cross[1].shape == (16, 32)  # k: grouped-query, 2 of 4 heads


def test_model_stage_saves_the_language_model_exactly(mllama, pipeline):
    _, model_dir, base, _ = pipeline
    assert base == model_dir and not (model_dir / model.SOURCE).exists()
    files, src = saved_tensors(model_dir), saved_tensors(mllama)
    assert files.keys() == {n.removeprefix("language_model.") for n in src if n.startswith("language_model.")}
    assert all(torch.equal(t, src[f"language_model.{n}"]) for n, t in files.items())
    assert lm.load_tokenizer(model_dir).get_vocab() == lm.load_tokenizer(mllama).get_vocab()


def test_sft_checkpoints_read_back_with_the_names_of_step_0(pipeline, tmp_path):
    cfg, _, base, step2 = pipeline
    mats = select_matrices(base, cfg.svd)
    assert [m.param for m in select_matrices(step2, cfg.svd)] == [m.param for m in mats]
    check_same_matrices(step2, mats)  # what the svd stage runs before comparing base -> B
    model = lm.load_model(step2)
    assert type(model) is MllamaForCausalLM
    params = dict(model.named_parameters())
    assert all(torch.equal(params[m.param], read_tensor(step2, m.param)) for m in mats)  # editing writes by these names
    # Text-only forward passes skip the cross-attention layer, so SFT leaves it bit-identical:
    # in the svd tables its matrices are exact zero-change controls, the rest did move.
    for m in mats:
        same = torch.equal(read_tensor(base, m.param), read_tensor(step2, m.param))
        assert same == (m.layer == CROSS_LAYER), m.param
    # save -> reload is exact
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert saved_tensors(tmp_path).keys() == saved_tensors(step2).keys()
    assert all(torch.equal(saved_tensors(tmp_path)[n], t) for n, t in saved_tensors(step2).items())
    again = state(lm.load_model(tmp_path))
    assert again.keys() == model.state_dict().keys()
    assert all(torch.equal(again[n], t) for n, t in model.state_dict().items())


def test_compat_layer_range_edits_take_the_embedding_and_lm_head_of_the_saved_language_model(mllama, tmp_path):
    """analysis.md §4.2 quirk 4 on Llama 3.2 Vision as the study holds it: the model stage saves
    its language model (`model_type` mllama_text_model), and a reference_compat layer-range edit
    must still take the input embedding and lm_head (untied here: 8 more embedding rows), as the
    authors' code did on the Mllama names; the other layers stay bit for bit."""
    dirs = {"sft-2": tmp_path / "sft-2", "sft-1": tmp_path / "sft-1"}
    model.save_text_model(mllama, dirs["sft-2"])  # what the model stage writes
    assert json.loads((dirs["sft-2"] / "config.json").read_text())["model_type"] == "mllama_text_model"
    g = torch.Generator().manual_seed(1)
    donor = {k: v + 0.1 * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 else v for k, v in saved_tensors(dirs["sft-2"]).items()}
    shutil.copytree(dirs["sft-2"], dirs["sft-1"])
    for f in dirs["sft-1"].glob("*.safetensors"):
        f.unlink()
    save_file({k: v.contiguous() for k, v in donor.items()}, dirs["sft-1"] / "model.safetensors", metadata={"format": "pt"})
    rows = {c: {"ckpt_id": c, "path": str(p), "content_hash": lm.weights_hash(p)} for c, p in dirs.items()}
    roles = pl.DataFrame({"role": ["B", "S"], "ckpt_id": ["sft-1", "sft-2"]})
    target = saved_tensors(dirs["sft-2"])
    for compat in (True, False):
        cfg = parse_config({"name": "mm", "edit": {"grid": "none", "reference_compat": compat, "variants": [{"method": "swap_directions", "k_top": 64, "layers": "0-0"}]}})
        [v] = [v for v in edit.variants(cfg, roles, N_LAYERS) if v["method"] != "none"]
        assert v["layers"] == [0] and v["reference_compat"] == compat
        dtype = torch.float16 if compat else torch.float32
        with edit.resident(rows["sft-2"], dtype) as loaded:
            assert type(loaded.model) is MllamaForCausalLM
            with edit.applied(Store(tmp_path / "store"), cfg, v, loaded, rows["sft-2"], rows["sft-1"]) as log:
                during = state(loaded.model)
        changed = {n for n in target if not torch.equal(during[n], target[n].to(dtype))}
        layer0 = {n for n in target if n.startswith("model.layers.0.") and target[n].ndim == 2}
        if compat:  # 64 >= every rank: each matrix in scope becomes the donor's (quirk 1), in float16 (quirk 5)
            assert changed == layer0 | {"model.embed_tokens.weight", "lm_head.weight"}
            assert all(torch.equal(during[n], donor[n].half()) for n in changed)
            assert {r["layer"] for r in log} == {-1, 0} and all(r["compat_early_exit"] for r in log)
        else:  # clean E3 edits the selected block matrices of layer 0 only
            assert changed == layer0 and {r["layer"] for r in log} == {0}
