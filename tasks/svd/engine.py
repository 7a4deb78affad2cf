"""The SVD engine and its on-disk cache (analysis.md §2, §4.5.1).

One routine, `svd`, decomposes every matrix the project ever decomposes, and counts each
call in `SVD_CALLS` under (object label, param): tests use it to prove that a matrix of a
checkpoint is decomposed once, whatever the number of measurements or edit variants.

Cache: one sealed store artifact per decomposed object (a checkpoint's weights, a delta
W_to - W_from, or a noise control) in the `svd` stage folder, holding one safetensors file
per matrix (`S` float64 always; `U_top`, `V_top`, `U_tail`, `V_tail` in the compute dtype)
and the stored column counts in its manifest. Objects are keyed by content hashes, never
by checkpoint names, so a renamed or re-registered checkpoint hits the same cache. A
request for more columns than a cached artifact holds builds a wider one; any artifact
that covers a request is used for it.

Columns (§2 `svd.columns: needed`): every object keeps the top columns of the measurement
k-grid; only the checkpoints the editing sweep reads (its donors and targets, by role) also
keep the columns its edits need (the flow passes `tasks.edit.column_requests`), and under reference_compat every
other 2-D tensor of them, so that editing decomposes nothing itself (§4.5 rule 1).
`columns_plan` states the same per object kind, for store-space estimates.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rlheal.caching import Stage
from rlheal.config import StudyConfig
from rlheal.store import Artifact, Store, stable_hash
from tasks import lm
from tasks.svd.matrices import Matrix, every_matrix, model_order, read_tensor, select_matrices, storage_dtype
from tasks.svd.metrics import NOISE_SEED, Factors, KSpec, noise_target, resolve_k

# The cache's artifacts live in the svd stage's folder, keyed by content (module docstring).
CACHE = Stage("svd", version="1")
log = logging.getLogger("rlheal.svd")

# (object label, param) -> number of matrices decomposed. Reset it freely in tests.
SVD_CALLS: Counter[tuple[str, str]] = Counter()


# ---------------------------------------------------------------------------- the routine


def compute_placement(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """§2: fp32 on a GPU, fp64 on the CPU (unless told otherwise)."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return dev, dtype or (torch.float32 if dev.type == "cuda" else torch.float64)


def svd(W: torch.Tensor, labels: Sequence[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of one matrix (m, n) or a stack of equal-shape matrices (b, m, n).

    Always the exact LAPACK / cuSOLVER path (`driver=None`: gesvdj with gesvd fallback on
    CUDA), never a randomized or `gesvda` approximation, since the results are stored."""
    if len(labels) != (W.shape[0] if W.ndim == 3 else 1):
        raise ValueError(f"svd: {len(labels)} labels for a tensor of shape {tuple(W.shape)}")
    SVD_CALLS.update(labels)
    return torch.linalg.svd(W, full_matrices=False)


def svd_bytes(m: int, n: int, dtype: torch.dtype) -> int:
    """Working memory of one thin SVD: the input, a workspace copy and U, S, V^T."""
    r = min(m, n)
    return torch.finfo(dtype).bits // 8 * (2 * m * n + m * r + r + r * n)


def batches(matrices: Sequence[Matrix], dtype: torch.dtype, memory_gib: float, batched: bool) -> Iterator[list[Matrix]]:
    """Groups to decompose together: equal-shape matrices under the memory cap (§2), or singles."""
    if not batched:
        yield from ([m] for m in matrices)
        return
    cap = memory_gib * 2**30
    by_shape: dict[tuple[int, int], list[Matrix]] = {}
    for mat in matrices:
        by_shape.setdefault(mat.shape, []).append(mat)
    for shape, group in by_shape.items():
        size = max(1, int(cap // svd_bytes(*shape, dtype)))
        for i in range(0, len(group), size):
            yield group[i : i + size]


def decompose(
    matrices: Sequence[Matrix],
    load: Callable[[Matrix], torch.Tensor],
    label: str,
    device: torch.device,
    dtype: torch.dtype,
    batched: bool = False,
    memory_gib: float = 4.0,
) -> Iterator[tuple[Matrix, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stream (matrix, U, S, V^T) over `matrices`; `load` returns one matrix. At most one batch
    is held in the compute dtype at a time."""
    for group in batches(matrices, dtype, memory_gib, batched):
        Ws = [load(mat).to(device=device, dtype=dtype) for mat in group]
        labels = [(label, mat.param) for mat in group]
        if len(group) == 1:
            U, S, Vh = svd(Ws[0], labels)
            yield group[0], U, S, Vh
        else:
            U, S, Vh = svd(torch.stack(Ws), labels)
            del Ws
            for i, mat in enumerate(group):
                yield mat, U[i], S[i], Vh[i]
        del U, S, Vh


# ---------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class ColumnRequest:
    """Which singular vectors a consumer needs, as k-specs resolved per matrix: the largest
    top-k and the largest tail-k over `top` / `tail`; `all` keeps every column.
    `all_matrices`: decompose every 2-D tensor of the checkpoint, not only the svd selection
    (what reference_compat editing touches, §4.2 quirk 3). Requests combine with `|` (a
    checkpoint that editing reads gets its grid on top of the measurement grid)."""

    top: tuple[KSpec, ...] = ()
    tail: tuple[KSpec, ...] = ()
    all: bool = False
    all_matrices: bool = False

    def columns(self, r: int) -> tuple[int, int]:
        """(top, tail) columns to keep for a matrix of rank r; (r, 0) = all of them."""
        if self.all:
            return r, 0
        top = min(r, max((resolve_k(s, r) for s in self.top), default=0))
        tail = min(r, max((resolve_k(s, r) for s in self.tail), default=0))
        return (r, 0) if top + tail >= r else (top, tail)

    def __or__(self, other: ColumnRequest) -> ColumnRequest:
        return ColumnRequest(
            tuple(dict.fromkeys(self.top + other.top)), tuple(dict.fromkeys(self.tail + other.tail)),
            self.all or other.all, self.all_matrices or other.all_matrices,
        )  # fmt: skip

    def key(self) -> dict:
        key = {"all": True} if self.all else {"top": sorted(map(repr, self.top)), "tail": sorted(map(repr, self.tail))}
        return key | ({"all_matrices": True} if self.all_matrices else {})


def column_request(cfg: StudyConfig) -> ColumnRequest:
    """The measurement grid's needs (`svd.columns: needed`) or everything (`all`): what every
    decomposed object stores, checkpoints, deltas and noise controls alike."""
    return ColumnRequest(all=True) if cfg.svd.columns == "all" else ColumnRequest(top=tuple(cfg.svd.k))


def columns_plan(
    cfg: StudyConfig, shapes: Sequence[tuple[int, int]], other_shapes: Sequence[tuple[int, int]] = (), edit_columns: Mapping[str, ColumnRequest] | None = None,
) -> dict[str, list[tuple[int, int]]]:
    """How many singular-vector columns the svd cache stores per matrix, by object kind, for a
    store-space estimate: kind -> one (top, tail) per matrix, where U keeps m x (top + tail)
    and V n x (top + tail) values in the compute dtype (plus all r singular values as float64).

    `shapes`: the (m, n) of the matrices the svd stage selects (svd.include ...);
    `other_shapes`: every other 2-D tensor of the checkpoint (embeddings, lm_head, ...),
    decomposed only for the checkpoints reference_compat editing reads (§4.2 quirk 3).
    Kinds: `checkpoint` (a checkpoint that is only measured), `delta`, `noise`, and
    `edit:<role>` for each role (base, B, S, R) whose checkpoint editing reads: that checkpoint
    stores `edit:<role>` instead of `checkpoint` (one with two roles stores the larger of
    each), with `shapes` then, where the request says so, `other_shapes` in that order.
    `edit_columns`: role -> what editing reads (`tasks.edit.column_requests`); none given,
    no checkpoint is an editing one."""
    measured = column_request(cfg)
    plan = {kind: [measured.columns(min(s)) for s in shapes] for kind in ("checkpoint", "delta", "noise")}
    for role, req in (edit_columns or {}).items():
        both = measured | req
        plan[f"edit:{role}"] = [both.columns(min(s)) for s in shapes] + ([req.columns(min(s)) for s in other_shapes] if req.all_matrices else [])
    return plan


# ---------------------------------------------------------------------------- the cache


@dataclass
class Cached:
    """A sealed cache artifact: per-matrix factor files and the columns each holds."""

    path: Path
    columns: dict[str, dict]
    device: torch.device
    dtype: torch.dtype

    def factors(self, mat: Matrix) -> Factors:
        with safe_open(self.path / f"{mat.param}.safetensors", framework="pt") as sf:
            t = {k: sf.get_tensor(k) for k in sf.keys()}
        on = dict(device=self.device, dtype=self.dtype)
        empty_u, empty_v = torch.empty(mat.m, 0, **on), torch.empty(mat.n, 0, **on)
        return Factors(
            t["S"].to(self.device), t["U_top"].to(**on), t["V_top"].to(**on),
            t["U_tail"].to(**on) if "U_tail" in t else empty_u, t["V_tail"].to(**on) if "V_tail" in t else empty_v,
            mat.m, mat.n,
        )  # fmt: skip

    def covers(self, matrices: Sequence[Matrix], request: ColumnRequest) -> bool:
        """Every matrix present with at least the requested columns."""
        for mat in matrices:
            have = self.columns.get(mat.param)
            if have is None or (have["m"], have["n"]) != mat.shape:
                return False
            top, tail = request.columns(mat.r)
            if have["top"] < mat.r and (have["top"] < top or have["tail"] < tail):
                return False
        return True


def _write_factors(tmp: Path, mat: Matrix, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, request: ColumnRequest) -> dict:
    top, tail = request.columns(mat.r)
    f = Factors.from_svd(U, S, Vh, top, tail)
    tensors = {"S": f.S, "U_top": f.U_top, "V_top": f.V_top}
    if tail:
        tensors |= {"U_tail": f.U_tail, "V_tail": f.V_tail}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / f"{mat.param}.safetensors")
    return {"m": mat.m, "n": mat.n, "top": top, "tail": tail}


@dataclass
class SvdCache:
    """Decompose-once access to the factors of checkpoints, deltas and noise controls.

    `row` arguments are `checkpoints` rows (ckpt_id, path, content_hash). Labels in
    `SVD_CALLS` are the ckpt_id, the delta id `<from>..<to>` or `noise:<ref>..<tgt>`.
    `request` is the default; `weights(row, request)` asks more of one checkpoint (the ones
    editing reads), and a request with `all_matrices` adds every other 2-D tensor of it."""

    store: Store
    matrices: list[Matrix]
    request: ColumnRequest = ColumnRequest()
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    batched: bool | None = None
    memory_gib: float = 4.0
    _found: dict[str, Cached] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.device, self.dtype = compute_placement(self.device, self.dtype)
        if self.batched is None:
            self.batched = self.device.type == "cuda"

    # -- reading weights
    def weight(self, row: dict, mat: Matrix) -> torch.Tensor:
        return read_tensor(row["path"], mat.param, self.device, self.dtype)

    # -- the three kinds of decomposed objects
    def weights(self, row: dict, request: ColumnRequest | None = None) -> Cached:
        request = request or self.request
        obj, matrices = self._weights_object(row, request)
        extra = {"ckpt_id": row["ckpt_id"], "path": str(row["path"]), "storage_dtype": storage_dtype(row["path"])}
        return self._get(obj, row["ckpt_id"], lambda mat: self.weight(row, mat), extra, request, matrices)

    def weights_artifact(self, row: dict, request: ColumnRequest | None = None) -> Artifact:
        """Where `weights(row, request)` finds its factors: a sealed cache artifact that holds
        them, else the one it would build (the flow's look-up before it submits the task)."""
        request = request or self.request
        obj, matrices = self._weights_object(row, request)
        found = self._find(self._config(obj), request, matrices)
        return Store.from_path(found.path) if found else self._artifact(self._config(obj), request, matrices)

    def _weights_object(self, row: dict, request: ColumnRequest) -> tuple[dict, list[Matrix]]:
        matrices = self.matrices
        if request.all_matrices:
            have = {m.param for m in matrices}
            matrices = sorted(matrices + [m for m in every_matrix(row["path"]) if m.param not in have], key=model_order)
        return {"kind": "weight", "content_hash": content_hash(row)}, matrices

    def delta(self, frm: dict, to: dict) -> Cached:
        obj = {"kind": "delta", "from": content_hash(frm), "to": content_hash(to)}
        label = f"{frm['ckpt_id']}..{to['ckpt_id']}"
        return self._get(obj, label, lambda mat: self.weight(to, mat) - self.weight(frm, mat), {"delta_id": label})

    def noise(self, ref: dict, tgt: dict, seed: int = NOISE_SEED) -> Cached:
        obj = {"kind": "noise", "ref": content_hash(ref), "tgt": content_hash(tgt), "seed": seed}
        label = noise_id(ref["ckpt_id"], tgt["ckpt_id"])
        return self._get(obj, label, lambda mat: self.noise_matrix(ref, tgt, mat, seed), {"noise_id": label})

    def noise_matrix(self, ref: dict, tgt: dict, mat: Matrix, seed: int = NOISE_SEED) -> torch.Tensor:
        Wa = self.weight(ref, mat)
        return noise_target(Wa, float(torch.linalg.matrix_norm(self.weight(tgt, mat) - Wa)), mat.param, seed)

    # -- look-up and build
    def _config(self, obj: dict) -> dict:
        return {"kind": "svd_cache", "object": obj, "compute_dtype": str(self.dtype).removeprefix("torch."), "version": CACHE.version}

    def _get(
        self, obj: dict, label: str, load: Callable[[Matrix], torch.Tensor], extra: dict,
        request: ColumnRequest | None = None, matrices: list[Matrix] | None = None,
    ) -> Cached:  # fmt: skip
        request, matrices = request or self.request, matrices or self.matrices
        config = self._config(obj)
        if (hit := self._find(config, request, matrices)) is not None:
            return hit
        art = self._artifact(config, request, matrices)

        def build(tmp: Path) -> dict:
            t0 = time.perf_counter()
            columns = {}
            for mat, U, S, Vh in decompose(matrices, load, label, self.device, self.dtype, self.batched, self.memory_gib):
                columns[mat.param] = _write_factors(tmp, mat, U, S, Vh, request)
            log.info("svd %s: %d matrices decomposed in %.2f s (%s on %s)", label, len(columns), time.perf_counter() - t0, self.dtype, self.device)
            return {"columns": columns, "label": label, **extra}

        path = self.store.build(art, build)
        found = Cached(path, self.store.manifest(path)["columns"], self.device, self.dtype)
        self._found[stable_hash(config)] = found
        return found

    def _find(self, config: dict, request: ColumnRequest, matrices: list[Matrix]) -> Cached | None:
        """A sealed cache artifact of the object that holds the requested columns."""
        ident = stable_hash(config)
        hit = self._found.get(ident)
        if hit is not None and hit.covers(matrices, request):
            return hit
        for cand in self._candidates(config):
            if cand.covers(matrices, request) and self.store.is_sealed(cand.path):
                self._found[ident] = cand
                return cand
        return None

    def _artifact(self, config: dict, request: ColumnRequest, matrices: list[Matrix]) -> Artifact:
        key_config = config | {"params": stable_hash([m.param for m in matrices]), "columns": request.key()}
        return CACHE.artifact(self.store, key_config)

    def _candidates(self, config: dict) -> Iterator[Cached]:
        """Sealed cache artifacts of the same object, dtype and code version, widest first."""
        found = []
        for manifest in (self.store.root / CACHE.name).glob("*/manifest.json"):
            try:
                m = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            if {k: m.get("config", {}).get(k) for k in config} == config and "columns" in m:
                found.append(Cached(manifest.parent, m["columns"], self.device, self.dtype))
        yield from sorted(found, key=lambda c: -sum(v["top"] + v["tail"] for v in c.columns.values()))


def content_hash(row: dict) -> str:
    """A checkpoint's weights hash, from its row or (missing) from its files."""
    return row.get("content_hash") or lm.weights_hash(Path(row["path"]))


def noise_id(ref_id: str, tgt_id: str) -> str:
    return f"noise:{ref_id}..{tgt_id}"


def load_svd(
    store: Store,
    cfg: StudyConfig,
    ckpt_row: dict,
    param: str,
    request: ColumnRequest | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Factors:
    """The cached factors of one matrix of a checkpoint, decomposing the checkpoint's selected
    matrices (cfg.svd) once if no cached artifact covers `request` (default: cfg's own).
    For many matrices, hold one `SvdCache` and call `.weights(row).factors(mat)` instead."""
    matrices = select_matrices(ckpt_row["path"], cfg.svd)
    mat = next((m for m in matrices if m.param == param), None)
    if mat is None:
        raise KeyError(f"{param!r} is not one of the matrices svd.include selects in {ckpt_row['path']}")
    cache = SvdCache(store, matrices, request or column_request(cfg), device, dtype, memory_gib=cfg.svd.batch_memory_gib)
    return cache.weights(ckpt_row).factors(mat)
