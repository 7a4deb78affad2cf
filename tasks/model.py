"""Stage `model`: where the starting model comes from (training.md §1).

- `model.builtin: tiny` builds the embedded default: a small Llama with grouped-query
  attention (so k/v projections are non-square, as in real models) and a word-level
  tokenizer over the benchmark's own text, saved as an ordinary HF directory.
- `model.name_or_path` resolves a local directory or a model already in the local HF
  cache; the hub is never contacted. The artifact points to it, except for a Mllama
  (vision + text) checkpoint, whose language model is saved into the artifact instead
  (`save_text_model`).
Every later stage loads either through `tasks.lm.load_model` / `load_tokenizer`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from prefect import task
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlheal.caching import Stage
from rlheal.config import ConfigError, ModelSection, StudyConfig
from rlheal.faults import maybe_fail
from rlheal.store import Artifact, Store, sha256_file
from tasks import benchmark, lm
from tasks.benchmark import Benchmark

STAGE = Stage("model", version="1")
SOURCE = "source.json"
log = logging.getLogger("rlheal.model")

# ---------------------------------------------------------------------------- tokenizer

SPECIAL = {"pad": "<|pad|>", "unk": "<|unk|>", "eos": "<|end|>"}
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
def build_tokenizer(bench: Benchmark) -> PreTrainedTokenizerFast:
    """Word-level vocabulary: every printable ASCII character, every 1- and 2-digit
    string (card values and 24 are one token each), plus the task's fixed phrases
    (`Benchmark.phrases`: one token per fixed chunk) as added tokens. Any text made of ASCII round-trips exactly, so a model's raw output
    can be fed back into the conversation losslessly (GP §8)."""
    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    digits = [f"{i:02d}" for i in range(100)]
    vocab = {tok: i for i, tok in enumerate([SPECIAL["unk"], *dict.fromkeys(chars + digits)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\d{1,2}|[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_tokens([AddedToken(p, normalized=False, single_word=False) for p in bench.phrases()])
    specials = [SPECIAL["pad"], SPECIAL["eos"], *(f"<|{r}|>" for r in ROLES)]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=SPECIAL["unk"],
        pad_token=SPECIAL["pad"],
        eos_token=SPECIAL["eos"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---------------------------------------------------------------------------- model


def build_tiny(out: Path, cfg: StudyConfig) -> dict:
    """Build the embedded default deterministically from its seed, with the study's task's
    vocabulary, and save it as an HF directory."""
    tok = build_tokenizer(benchmark.of(cfg))
    t = cfg.model.tiny
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(t.seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    log.info("built tiny model: %d parameters, vocabulary %d", n, len(tok))
    return {"parameters": n, "vocab_size": len(tok)}


def resolve_pretrained(section: ModelSection) -> Path:
    """A local directory, or a model already in the local HF cache; never a download."""
    name = section.name_or_path
    if Path(name).expanduser().is_dir():
        path = Path(name).expanduser().absolute()
    else:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name, local_files_only=True))
        except Exception:
            raise ConfigError(
                f"model.name_or_path: {name!r} is neither a directory nor a model in the local Hugging Face "
                f"cache (rlheal never downloads at run time; fetch it first, e.g. `hf download {name}`)"
            ) from None
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise ConfigError(f"model.name_or_path: {path} has no config.json or *.safetensors weights")
    return path


def key_config(cfg: StudyConfig) -> dict:
    m = cfg.model
    # the tiny model's vocabulary is the task's (`build_tokenizer`): its phrases are in the
    # key, so a task whose phrases change gets a new model, not a stale tokenizer
    if not m.builtin:
        return {"name_or_path": m.name_or_path}
    phrases = hashlib.sha256(json.dumps(benchmark.of(cfg).phrases()).encode()).hexdigest()
    return {"builtin": m.tiny.model_dump(), "task": cfg.task, "phrases": phrases}


def artifact(store: Store, cfg: StudyConfig) -> Artifact:
    return STAGE.artifact(store, key_config(cfg))


def build(out: Path, cfg: StudyConfig) -> dict:
    if cfg.model.builtin:
        extra = build_tiny(out, cfg)
        return {**extra, "weights_sha256": lm.weights_hash(out)}
    src = resolve_pretrained(cfg.model)
    digest = lm.weights_hash(src)
    if lm.model_type(src) == "mllama":
        return {**save_text_model(src, out, cfg.model.trust_remote_code), "source": {"path": str(src), "weights_sha256": digest}}
    (out / SOURCE).write_text(json.dumps({"path": str(src), "weights_sha256": digest}))
    return {"weights_sha256": digest}


def save_text_model(src: Path, out: Path, trust_remote_code: bool = False) -> dict:
    """The language model of a multimodal checkpoint, saved as the starting model.

    Step 0 must name its tensors as every later checkpoint does (the svd stage compares
    them by name, editing writes them into the loaded model by name). Fine-tuned
    checkpoints are saved from the model `load_model` returns (`model.layers.N…`), while a
    hub Mllama directory names the same tensors `language_model.model.layers.N…` beside
    its vision tower; so the starting model goes through the same load and save."""
    model = lm.load_model(src, dtype="auto", trust_remote_code=trust_remote_code)  # the stored dtype: an exact copy
    model.save_pretrained(out, safe_serialization=True)
    lm.load_tokenizer(src, trust_remote_code).save_pretrained(out)
    log.info("saved the %s language model of %s (%s)", type(model).__name__, src, model.dtype)
    return {"weights_sha256": lm.weights_hash(out)}


def model_dir(art_path: str | Path) -> Path:
    """The HF directory behind a model artifact (itself, or the external model it points to)."""
    p = Path(art_path)
    return Path(json.loads((p / SOURCE).read_text())["path"]) if (p / SOURCE).is_file() else p


def make(art: Artifact, cfg: StudyConfig) -> Path:
    """The model artifact `art`: found sealed, or built."""
    if cfg.model.name_or_path:
        resolve_pretrained(cfg.model)  # fail fast, before taking any lock
    return STAGE.build(art, lambda tmp: build(tmp, cfg))


def run(store: Store, cfg: StudyConfig) -> Path:
    """Build (or find) the model artifact; plain function, no Prefect needed."""
    return make(artifact(store, cfg), cfg)


@task(name=STAGE.name, task_run_name="model")
def stage(artifact: Artifact, cfg: StudyConfig) -> str:
    maybe_fail("model")
    return str(make(artifact, cfg))
