"""The language model as every stage uses it: load, decode, score (training.md §6, §7.3).

- `load_tokenizer` / `load_model`: a checkpoint directory, safetensors only, never the hub;
- `ModelGenerator`: batched, left-padded generation with exactly the study's decoding
  (`generation_config`, applied with `only`), the `Generate` callable episode loops drive;
- `reference_nll` / `reference_ce`: the teacher-forced NLL of a target answer;
- `lora_config`: the adapters of a LoRA section (SFT and GRPO).
`GLOBAL_RNG` serialises every use of torch's global random stream (sampled decoding).
Conversations are rendered by the one renderer, tasks/chat.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import polars as pl
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, MllamaForCausalLM, PreTrainedTokenizerFast

from rlheal.store import sha256_file
from tasks.chat import encode, left_pad, prompt_completion_ids, render, stop_token_ids

Messages = list[dict[str, str]]

# torch's global RNG drives sampling in generate(): runs that sample (RL rollouts, sampled
# evaluation) take this lock so parallel tasks on the thread runner never interleave their
# random streams, which would make results depend on scheduling. Processes (Dask) are separate.
GLOBAL_RNG = threading.RLock()

# from_pretrained initialises on the meta device through process-global state: two
# threads loading at once (parallel tasks on the thread runner) corrupt each other.
_load_lock = threading.Lock()


def weights_hash(path: Path) -> str:
    """Content hash of a model directory's weights (all safetensors files)."""
    return weights_hash_of({f.name: sha256_file(f) for f in Path(path).glob("*.safetensors")})


def weights_hash_of(sha256: Mapping[str, str]) -> str:
    """`weights_hash` from the files' own sha256 (file name -> digest; other files ignored):
    a sealed checkpoint's manifest holds them, so its hash needs no second read of its weights."""
    h = hashlib.sha256()
    for name in sorted(n for n in sha256 if n.endswith(".safetensors") and "/" not in n):
        h.update(name.encode() + sha256[name].encode())
    return h.hexdigest()


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """Load a causal LM from safetensors only (no pickle), in `dtype` on `device`.

    A Mllama (Llama 3.2 Vision) checkpoint loads as its language model alone, an
    `MllamaForCausalLM`: the benchmark is text-only, and without image states the model
    skips its cross-attention layers anyway. Saving it writes a text-only checkpoint that
    this function reads back the same way."""
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, local_files_only=True)
    with _load_lock:
        if model_type(path) == "mllama_text_model":
            # What a saved MllamaForCausalLM declares; AutoModelForCausalLM maps only the
            # multimodal `mllama` type to it and rejects this one.
            model = MllamaForCausalLM.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if isinstance(model, MllamaForCausalLM):
        # Its `base_model_prefix` is "language_model" (the hub files' prefix, stripped on
        # load) but the backbone lives in `.model`, so `base_model` returned the whole model
        # and TRL's fused LM head, which takes hidden states from `base_model`, got the
        # LM output instead (SFTTrainer: no attribute 'last_hidden_state').
        model.base_model_prefix = "model"
    return model.to(device)


def model_type(path: str | Path) -> str | None:
    cfg_file = Path(path) / "config.json"
    return json.loads(cfg_file.read_text()).get("model_type") if cfg_file.is_file() else None


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load a checkpoint's tokenizer. Word-level tokenizers saved as plain
    `PreTrainedTokenizerFast` are loaded as such: AutoTokenizer may rebuild them for the
    model type (e.g. as byte-level BPE for `qwen2`) and silently return garbage."""
    cfg_file = Path(path) / "tokenizer_config.json"
    cls = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    if cls in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def lora_config(section, model, where: str):
    """peft's LoraConfig of a `LoraSection` for this model: the targets are module-name suffixes,
    and a list that matches no module of the model is an error naming the field (`where`)."""
    from peft import LoraConfig

    targets = [t for t in section.targets if any(name.endswith(t) for name, _ in model.named_modules())]
    if not targets:
        raise ValueError(f"{where}.targets: none of {section.targets} matches a module of the model")
    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout, target_modules=targets, task_type="CAUSAL_LM")


# ---------------------------------------------------------------------------- decoding


@dataclasses.dataclass(frozen=True)
class Generation:
    """One generated response: its text and how it ended."""

    text: str
    tokens: int = 0
    hit_max_new_tokens: bool = False


Generate = Callable[[list[Messages]], list[Generation]]


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and "out of memory" in str(err))


def generation_config(decoding: dict[str, Any], tok) -> GenerationConfig:
    """A complete GenerationConfig from the study's resolved decoding (training.md §6).

    Sampling knobs are set only when sampling: greedy ignores them and transformers
    warns about them. top_k 0 is passed as 0, which transformers treats as off (a None
    would be filled with its default of 50)."""
    values = {
        "do_sample": decoding["do_sample"],
        "repetition_penalty": decoding["repetition_penalty"],
        "max_new_tokens": decoding["max_new_tokens"],
        "num_beams": 1,
        "eos_token_id": stop_token_ids(tok),
        "pad_token_id": tok.pad_token_id,
    }
    if decoding["do_sample"]:
        values.update(temperature=decoding["temperature"], top_p=decoding["top_p"], top_k=decoding["top_k"])
    return GenerationConfig(**values)


@contextlib.contextmanager
def only(model, config: GenerationConfig):
    """Make `config` the model's own generation config for the call: transformers fills
    every field left None in the passed config from `model.generation_config` (the
    checkpoint's generation_config.json), e.g. min_new_tokens or no_repeat_ngram_size."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT wrapper
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


class ModelGenerator:
    """`Generate` for a Hugging Face causal LM: one left-padded batch per call, KV cache,
    the study's decoding only. Conversations are rendered by the one renderer (GP §4)."""

    def __init__(self, model, tok, decoding: dict[str, Any], date_string: str | None):
        self.model, self.tok, self.date_string = model, tok, date_string
        self.config = generation_config(decoding, tok)
        self.stops = set(self.config.eos_token_id)
        self.device = next(model.parameters()).device

    def prompt_ids(self, messages: Messages) -> list[int]:
        return encode(self.tok, render(self.tok, messages, add_generation_prompt=True, date_string=self.date_string))

    def length(self, messages: Messages) -> int:
        return len(self.prompt_ids(messages))

    def __call__(self, conversations: list[Messages]) -> list[Generation]:
        return [self._finish(row) for row in self.new_ids([self.prompt_ids(m) for m in conversations])]

    @torch.no_grad()
    def new_ids(self, prompts: list[list[int]]) -> list[list[int]]:
        """The generated ids of one left-padded batch of prompt ids, padding included."""
        ids, mask = left_pad(prompts, self.tok.pad_token_id)
        with only(self.model, self.config):
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), generation_config=self.config)
        return out[:, ids.shape[1] :].tolist()

    def answer_ids(self, prompts: list[list[int]]) -> list[list[int]]:
        """Each answer's ids up to and including its stop token (the ids themselves: decoding
        and encoding the text again need not give them back)."""
        return [new[: self._end(new)] for new in self.new_ids(prompts)]

    def _end(self, new: list[int]) -> int:
        # Rows that stop early are padded after their stop token; count up to the stop.
        return next((t + 1 for t, tid in enumerate(new) if tid in self.stops), len(new))

    def _finish(self, new: list[int]) -> Generation:
        end = self._end(new)
        stopped = end > 0 and new[end - 1] in self.stops
        text = self.tok.decode(new[: end - 1] if stopped else new, skip_special_tokens=True)
        return Generation(text, end, not stopped)


# ---------------------------------------------------------------------------- scoring


def reference_ce(model, tok, table: pl.DataFrame, n: int, date_string: str | None, batch_size: int = 64) -> float:
    """`ce_id` / `ce_ood` (§7.3): the mean of CE_h over the first `n` hands."""
    per_hand = reference_nll(model, tok, table, n, date_string, batch_size)
    return float(sum(per_hand) / len(per_hand)) if per_hand else float("nan")


@torch.no_grad()
def reference_nll(model, tok, table: pl.DataFrame, n: int, date_string: str | None, batch_size: int = 64) -> list[float]:
    """CE_h of the first `n` hands (§7.3): the mean NLL (nats, temperature 1) of the
    trained target answer (`target`: the completion an SFT row of the hand carries, which
    is the dealt reference unless `data.answer: first`) plus end-of-turn tokens, given the
    single-turn prompt."""
    rows = table.head(n)
    seqs = [
        prompt_completion_ids(tok, [{"role": "user", "content": p}], [{"role": "assistant", "content": a}], date_string)
        for p, a in zip(rows["prompt"], rows["target"])
    ]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_hand: list[float] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, (seq, n_prompt) in enumerate(chunk):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            scored[i, n_prompt : len(seq)] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        # position t predicts token t+1
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device), reduction="none")
        target = scored[:, 1:].to(device)
        per_hand += ((nll * target).sum(1) / target.sum(1)).tolist()
    model.train(was_training)
    return per_hand
