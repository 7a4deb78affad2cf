"""Edits applied to a model in memory (analysis.md §4.1, §4.2, §4.5.3).

The target is loaded once per process and kept (`resident`); each variant backs up only the
tensors it edits, writes W' in place, is evaluated, and is restored, after which a checksum
of every parameter and buffer must equal the one taken at load: the next variant starts from
a model bit-identical to the checkpoint. Singular vectors come from the SVD cache of the svd
stage (one decomposition per checkpoint and matrix for the whole sweep, §4.5.1); W' is
computed in the compute dtype (float64 on CPU, float32 on CUDA) and cast once to the
parameter's dtype.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rlheal.config import StudyConfig, SvdSection
from rlheal.store import Store, stable_hash
from tasks import lm
from tasks.edit.formulas import edit_matrix, index_set, resolve_edit_k
from tasks.edit.grid import column_requests
from tasks.svd.engine import ColumnRequest, SvdCache, compute_placement, content_hash
from tasks.svd.matrices import Matrix, check_same_matrices, every_matrix, read_tensor, select_matrices, storage_dtype

log = logging.getLogger("rlheal.edit")

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# Quirk 4: the authors' layer pattern, and the model types whose embedding and lm_head names
# their code matched (it hard-coded Mllama's; Qwen's never matched). `mllama_text_model` is
# Llama 3.2 Vision as the study holds it: the model stage saves its language model alone.
COMPAT_LAYER = re.compile(r"model\.layers\.(\d+)\.")
COMPAT_EMBED_HEAD_TYPES = ("llama", "mllama", "mllama_text_model")


# ---------------------------------------------------------------------------- the checkpoint


def hf_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def n_layers(path: str | Path) -> int:
    """Decoder layers of a checkpoint (a multimodal model's text layers)."""
    cfg = hf_config(path)
    n = cfg.get("num_hidden_layers", cfg.get("text_config", {}).get("num_hidden_layers"))
    if n is None:
        raise ValueError(f"{path}/config.json: no num_hidden_layers (nor text_config.num_hidden_layers)")
    return int(n)


def model_dtype(path: str | Path, reference_compat: bool) -> torch.dtype:
    """The target's own storage dtype (bf16 stays bf16); float16 under quirk 5."""
    return torch.float16 if reference_compat else TORCH_DTYPES.get(storage_dtype(path), torch.float32)


def base_matrices(path: str | Path, section: SvdSection, reference_compat: bool) -> list[Matrix]:
    """The matrices an edit may touch: the svd selection (§1.1), or everything 2-D under quirk 3."""
    return every_matrix(path) if reference_compat else select_matrices(path, section)


def in_scope(variant: dict, matrices: list[Matrix], model_type: str) -> list[Matrix]:
    """The matrices a variant edits: E3's layer filter (§4.1), then the module filter. Under
    reference_compat the layer comes from `model.layers.N.` and a llama / mllama layer-range
    edit also takes the input embedding and lm_head (quirk 4)."""
    if variant["method"] == "none":
        return []
    mats = matrices
    if variant["layers"] is not None:
        layers = set(variant["layers"])
        if variant["reference_compat"]:
            head = model_type in COMPAT_EMBED_HEAD_TYPES
            mats = [m for m in mats if (head and m.block in ("embed", "lm_head")) or ((x := COMPAT_LAYER.search(m.param)) and int(x.group(1)) in layers)]
        else:
            mats = [m for m in mats if m.layer in layers]
    if variant["modules"]:
        mats = [m for m in mats if m.module in variant["modules"]]
    return mats


# ---------------------------------------------------------------------------- the resident target


def _checksum(t: Tensor, chunk: int = 1 << 24) -> tuple[int, int]:
    """Sum and position-weighted sum (mod 2^64) of a tensor's raw bits, on its own device: any
    changed element changes it, at the cost of one read (no copy of the model to the host)."""
    bits = t.detach().contiguous().reshape(-1)
    bits = bits.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[bits.element_size()])
    s = w = torch.zeros((), dtype=torch.int64, device=t.device)
    for i in range(0, bits.numel(), chunk):
        b = bits[i : i + chunk].to(torch.int64)
        s = s + b.sum()
        w = w + (b * torch.arange(i + 1, i + 1 + b.numel(), device=t.device)).sum()
    return int(s), int(w)


def fingerprint(model) -> str:
    """A checksum of every parameter and buffer (§4.5.3: the restore is verified against it)."""
    return stable_hash([(name, _checksum(t)) for name, t in model.state_dict().items()], length=32)


@dataclass
class Loaded:
    key: tuple
    model: torch.nn.Module
    tok: object
    params: dict[str, torch.nn.Parameter]
    fingerprint: str
    dtype: torch.dtype
    device: torch.device


_lock = threading.Lock()
_resident: Loaded | None = None


def target_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def resident(row: dict, dtype: torch.dtype, device: torch.device | None = None, trust_remote_code: bool = False) -> Iterator[Loaded]:
    """The target checkpoint in memory, loaded once per process and kept for the next variant.
    One variant at a time per process holds it (the edits are in place); a variant that
    fails leaves no model behind."""
    global _resident
    device = torch.device(device) if device is not None else target_device()
    key = (str(row["path"]), content_hash(row), str(dtype), str(device), trust_remote_code)
    with _lock:
        if _resident is None or _resident.key != key:
            _resident = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            model = lm.load_model(row["path"], dtype, device, trust_remote_code)
            tok = lm.load_tokenizer(row["path"], trust_remote_code)
            params = dict(model.named_parameters(remove_duplicate=False))
            _resident = Loaded(key, model, tok, params, fingerprint(model), dtype, device)
            log.info("edit: loaded %s as %s on %s", row["ckpt_id"], dtype, device)
        try:
            yield _resident
        except BaseException:
            _resident = None
            raise


def forget_resident() -> None:
    global _resident
    with _lock:
        _resident = None


@contextlib.contextmanager
def edited(loaded: Loaded, new_weights: Iterable[tuple[str, Tensor]]) -> Iterator[list[str]]:
    """Write each (name, W') in place, backing the original up to host memory first; yield the
    names; then restore them all and verify the checksum of the whole model."""
    backup: dict[str, Tensor] = {}
    written: set[int] = set()
    try:
        with torch.no_grad():
            for name, W in new_weights:
                p = loaded.params.get(name)
                if p is None:
                    raise KeyError(f"checkpoint tensor {name!r} is not a parameter of the loaded model (renamed on load?); cannot edit it in memory")
                if p.data_ptr() in written:  # a tied embedding / head: one tensor, edited once
                    raise ValueError(f"{name!r} shares its tensor with an already edited parameter")
                written.add(p.data_ptr())
                backup[name] = p.detach().to("cpu", copy=True)
                p.copy_(W)
        yield list(backup)
    finally:
        with torch.no_grad():
            for name, saved in backup.items():
                loaded.params[name].copy_(saved)
        if fingerprint(loaded.model) != loaded.fingerprint:
            raise RuntimeError("edit: the restored model is not bit-identical to the loaded checkpoint; refusing to evaluate another variant on it")


# ---------------------------------------------------------------------------- computing W'


def _rel(diff: Tensor, ref: Tensor) -> float | None:
    norm = float(torch.linalg.matrix_norm(ref))
    return float(torch.linalg.matrix_norm(diff)) / norm if norm > 0 else None


def new_weights(
    variant: dict,
    matrices: list[Matrix],
    target: dict,
    donor: dict,
    cache: SvdCache,
    dtypes: dict[str, torch.dtype],
    rows: list[dict],
    requests: dict[str, ColumnRequest] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """(param, W' in the parameter's dtype) for every matrix of the variant that changes, in
    model order; one `edit_matrix_log` row per matrix in scope is appended to `rows`.
    `requests`: the columns to ask of the "target" and the "donor" (default: cache.request)."""
    method, compat = variant["method"], variant["reference_compat"]
    device, dtype = cache.device, cache.dtype
    requests = requests or {}
    cached: dict[str, object] = {}  # the cache artifact of each side, looked up once

    def factors(side: str, row: dict, mat: Matrix):
        if side not in cached:
            cached[side] = cache.weights(row, requests.get(side))
        return cached[side].factors(mat)

    for mat in matrices:
        r = mat.r
        if method == "copy":
            k_top, k_tail = r, 0
        else:
            k_top, k_tail = index_set(resolve_edit_k(variant["k_top"], r, compat), resolve_edit_k(variant["k_tail"], r, compat), r)
        n = k_top + k_tail
        early = compat and n == r
        W_t = read_tensor(target["path"], mat.param, device, dtype)
        W_d = read_tensor(donor["path"], mat.param, device, dtype)
        changes = method == "copy" or n > 0
        if changes:
            svd_needed = method != "copy" and not early
            f_t = factors("target", target, mat) if svd_needed else None
            f_d = factors("donor", donor, mat) if svd_needed else None
            W = edit_matrix(method, W_t, W_d, f_t, f_d, k_top, k_tail, compat).to(dtypes.get(mat.param, dtype))
            W_new = W.to(dtype)
        else:
            W_new = W_t  # |𝒯| = 0: the parameter is left as loaded, bit for bit
        rows.append({
            "param": mat.param, "layer": mat.layer, "module": mat.module, "m": mat.m, "n": mat.n, "rank": r,
            "k_top_eff": k_top, "k_tail_eff": k_tail, "n_indices": n, "full_reset": n == r, "compat_early_exit": early,
            "rel_change_vs_target": _rel(W_new - W_t, W_t), "rel_dist_to_donor": _rel(W_new - W_d, W_d),
        })  # fmt: skip
        if changes:
            yield mat.param, W


def request_for(cfg: StudyConfig, variant: dict, side: str) -> ColumnRequest:
    """What the sweep reads from this side's (donor / target) role, so that every variant hits
    the artifact the svd stage built for that checkpoint, widened by this variant's own k if
    it was not part of the configured sweep."""
    own = ColumnRequest()
    if variant["method"] not in ("none", "copy"):
        own = ColumnRequest(tuple(k for k in [variant["k_top"]] if k), tuple(k for k in [variant["k_tail"]] if k), all_matrices=variant["reference_compat"])
    return column_requests(cfg).get(variant[f"{side}_role"], ColumnRequest()) | own


@contextlib.contextmanager
def applied(store: Store, cfg: StudyConfig, variant: dict, loaded: Loaded, target: dict, donor: dict | None, device=None, dtype=None) -> Iterator[list[dict]]:
    """The variant applied in place to the loaded target; yields its `edit_matrix_log` rows
    (without run columns). On exit the model is restored and verified."""
    compat = variant["reference_compat"]
    base = base_matrices(target["path"], cfg.svd, compat)
    mats = in_scope(variant, base, hf_config(target["path"]).get("model_type", ""))
    if mats and donor is None:
        raise ValueError(f"variant {variant['variant_id']}: method {variant['method']} needs a donor checkpoint")
    if mats:
        check_same_matrices(donor["path"], mats)
    device, dtype = compute_placement(device, dtype)
    cache = SvdCache(store, base, ColumnRequest(), device, dtype, memory_gib=cfg.svd.batch_memory_gib)
    requests = {side: request_for(cfg, variant, side) for side in ("target", "donor")}
    dtypes = {m.param: loaded.params[m.param].dtype for m in mats if m.param in loaded.params}
    rows: list[dict] = []
    with edited(loaded, new_weights(variant, mats, target, donor, cache, dtypes, rows, requests)):
        yield rows
