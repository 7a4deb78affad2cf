"""Which weight matrices the analysis looks at (analysis.md §1.1), read straight from a
checkpoint's safetensors files one tensor at a time.

Selection works on the tensor names of the files (no model is instantiated): a name is
selected when it fully matches an include pattern and no exclude pattern. 1-D tensors
(norms, biases) can never be selected; a pattern that selects one is a config error.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import safe_open

from rlheal.config import ConfigError, SvdSection
from rlheal.space import DTYPE_BYTES, ModelShapes

EMBEDDING = re.compile(r"(?:.*\.)?(?:embed_tokens|wte|word_embeddings)\.weight")
LM_HEAD = re.compile(r"(?:.*\.)?lm_head\.weight")
# Vision-tower and multimodal-projector weights are out by default (§1.1) even though the
# default include pattern would match their `layers.N.self_attn` names.
MULTIMODAL = re.compile(r"(?:.*\.)?(?:vision_model|vision_tower|visual|multi_modal_projector|mm_projector)\..*")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_BLOCK = re.compile(r"\.(self_attn|cross_attn|mlp)\.")


@dataclass(frozen=True)
class Matrix:
    """A selected weight: name, parsed position (layer -1 for embedding / head) and shape."""

    param: str
    layer: int
    block: str
    module: str
    m: int
    n: int

    @property
    def r(self) -> int:
        return min(self.m, self.n)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.m, self.n)


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


@lru_cache(maxsize=64)
def _index(path: Path, stamp: tuple) -> dict[str, TensorInfo]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():
                sl = sf.get_slice(name)
                out[name] = TensorInfo(f, tuple(sl.get_shape()), sl.get_dtype())
    return out


def tensor_index(path: str | Path) -> dict[str, TensorInfo]:
    """Name -> (file, shape, dtype) of every tensor in a checkpoint directory (headers only)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (is it a checkpoint directory?)")
    return _index(path, tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def read_tensor(path: str | Path, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor of a checkpoint, converted on the device: the whole model is never loaded."""
    info = tensor_index(path).get(name)
    if info is None:
        raise KeyError(f"{path}: no tensor named {name!r}")
    with safe_open(info.file, framework="pt") as sf:
        t = sf.get_tensor(name)
    return t.to(device=device, dtype=dtype or t.dtype)


def storage_dtype(path: str | Path) -> str:
    """The dtype that holds most of a checkpoint's parameters (e.g. BF16, F32)."""
    counts: Counter[str] = Counter()
    for info in tensor_index(path).values():
        counts[info.dtype] += max(1, _numel(info.shape))
    return counts.most_common(1)[0][0]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# Top-level files of a model directory that a checkpoint does not carry.
_NOT_CARRIED = ("README", "LICENSE", "USE_POLICY", "NOTICE", ".gitattributes")
_CARRIED = (".json", ".jinja", ".txt", ".model", ".tiktoken")


def model_shapes(path: Path, matrices: list[Matrix], copied: bool) -> ModelShapes:
    """`rlheal.space.ModelShapes` of the model directory at `path` (what a store-space estimate
    reads), from its safetensors headers and file sizes; `matrices`: the svd selection."""
    config = json.loads((path / "config.json").read_text())
    mllama = config.get("model_type") == "mllama"
    # A Mllama's checkpoints (and the model stage's copy) hold its language model only.
    index = {n: i for n, i in tensor_index(path).items() if not (mllama and MULTIMODAL.fullmatch(n))}
    tensors = tuple((n, _numel(i.shape), DTYPE_BYTES.get(i.dtype, 4)) for n, i in sorted(index.items()))
    files = sum(
        f.stat().st_size
        for f in path.iterdir()
        if f.is_file() and f.suffix in _CARRIED and not f.name.startswith(_NOT_CARRIED) and not f.name.endswith(".index.json")
    )
    selected = {m.param for m in matrices}
    others = tuple((m.m, m.n) for m in every_matrix(path) if m.param not in selected and m.param in index)
    hidden = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size") or 0
    return ModelShapes(tensors, files, tuple((m.m, m.n) for m in matrices), others, int(hidden), copied or mllama)


def check_k(section: SvdSection, matrices: list[Matrix]) -> None:
    """Every integer `svd.k` must admit at least one selected matrix (principal angles need
    1 <= k < min(m, n)); a config error naming the entry otherwise."""
    largest = max(m.r for m in matrices)
    for i, k in enumerate(section.k):
        if isinstance(k, int) and k >= largest:
            raise ConfigError(f"svd.k[{i}]: k = {k} is not below min(m, n) of any selected matrix (the largest is {largest}); principal angles need 1 <= k < min(m, n)")


def tied_embeddings(path: Path, names: set[str]) -> bool:
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    tied = cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings"))
    # HF drops a tied lm_head from the files; a missing head with an embedding present is tied.
    return bool(tied) if tied is not None else not any(LM_HEAD.fullmatch(n) for n in names)


def describe_matrix(name: str, shape: tuple[int, ...], groups: dict[str, str | None]) -> Matrix:
    if EMBEDDING.fullmatch(name):
        return Matrix(name, -1, "embed", "embed_tokens", *shape)
    if LM_HEAD.fullmatch(name):
        return Matrix(name, -1, "lm_head", "lm_head", *shape)
    layer = groups.get("layer") or ((m := _LAYER.search(name)) and m.group(1))
    block = groups.get("block") or ((b := _BLOCK.search(name)) and b.group(1)) or ""
    module = groups.get("module") or name.removesuffix(".weight").rsplit(".", 1)[-1].removesuffix("_proj")
    return Matrix(name, int(layer) if layer is not None else -1, block, module, *shape)


def select_matrices(path: str | Path, section: SvdSection) -> list[Matrix]:
    """§1.1: the selected 2-D weights of the checkpoint at `path`, in model order.

    Errors (ConfigError naming `svd.include`): an include pattern that matches no tensor,
    a selection that contains a 1-D tensor, or an empty selection."""
    path = Path(path)
    index = tensor_index(path)
    names = set(index)
    include = [re.compile(p) for p in section.include]
    exclude = [re.compile(p) for p in section.exclude] + [MULTIMODAL]
    chosen: dict[str, dict[str, str | None]] = {}
    for i, pat in enumerate(include):
        hits = [n for n in sorted(names) if pat.fullmatch(n)]
        if not hits:
            raise ConfigError(f"svd.include[{i}]: pattern {pat.pattern!r} matches no tensor of {path} (names look like {sorted(names)[:3]})")
        for name in hits:
            if not any(x.fullmatch(name) for x in exclude):
                chosen.setdefault(name, pat.fullmatch(name).groupdict())
    embedding = next((n for n in sorted(names) if EMBEDDING.fullmatch(n) and not MULTIMODAL.fullmatch(n)), None)
    head = next((n for n in sorted(names) if LM_HEAD.fullmatch(n)), None)
    tied = embedding is not None and tied_embeddings(path, names)
    if section.include_embeddings and embedding:
        chosen.setdefault(embedding, {})
    if section.include_lm_head:
        # Tied input/output embeddings are one matrix, named by the embedding key.
        target = embedding if tied else head
        if target is None:
            raise ConfigError(f"svd.include_lm_head: {path} has no lm_head weight and no tied embedding")
        chosen.setdefault(target, {})
    if tied and head in chosen and embedding in chosen:
        del chosen[head]
    one_d = [n for n in chosen if len(index[n].shape) != 2]
    if one_d:
        raise ConfigError(
            f"svd.include: selects {len(one_d)} tensor(s) that are not 2-D matrices, e.g. {one_d[0]!r} with shape {list(index[one_d[0]].shape)} "
            f"in {path}; norms and biases can never be analysed: narrow the pattern (end it in a module name + `\\.weight`) or add an svd.exclude"
        )
    if not chosen:
        raise ConfigError(f"svd.include: every tensor the patterns match in {path} is excluded (svd.exclude or the built-in vision/projector exclusion)")
    return sorted((describe_matrix(n, index[n].shape, chosen[n]) for n in chosen), key=model_order)


def every_matrix(path: str | Path) -> list[Matrix]:
    """Every 2-D tensor of a checkpoint (embeddings, lm_head, vision tower, projector), in model
    order; a tied lm_head is the embedding, counted once. What reference_compat editing touches
    (analysis.md §4.2 quirk 3), so the svd stage decomposes these for its donors and targets."""
    index = tensor_index(path)
    names = [n for n, info in index.items() if len(info.shape) == 2]
    if tied_embeddings(Path(path), set(index)) and any(EMBEDDING.fullmatch(n) for n in names):
        names = [n for n in names if not LM_HEAD.fullmatch(n)]
    return sorted((describe_matrix(n, index[n].shape, {}) for n in names), key=model_order)


_MODULE_ORDER = {name: i for i, name in enumerate(("self_attn", "cross_attn", "mlp", "q", "k", "v", "o", "gate", "up", "down"))}


def model_order(mat: Matrix) -> tuple:
    """Model order: embedding, then per layer q, k, v, o, gate, up, down; the head last."""
    if mat.block == "embed":
        return (-1,)
    if mat.layer < 0:
        return (1 << 30, mat.param)
    return (mat.layer, _MODULE_ORDER.get(mat.block, 99), _MODULE_ORDER.get(mat.module, 99), mat.param)


def check_same_matrices(path: str | Path, matrices: list[Matrix]) -> None:
    """Every analysed checkpoint must hold the selected matrices with the same shapes."""
    index = tensor_index(path)
    for mat in matrices:
        info = index.get(mat.param)
        if info is None or info.shape != mat.shape:
            got = "is missing" if info is None else f"has shape {list(info.shape)}"
            raise ValueError(f"{path}: tensor {mat.param!r} {got}, expected {list(mat.shape)} as in the other checkpoints")
