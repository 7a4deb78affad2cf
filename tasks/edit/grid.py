"""Which edit variants a study runs (analysis.md §4.1 E0–E5, §4.3 grids).

A variant is a plain dict (it travels as a Prefect parameter and into the store key):

    variant_id      deterministic slug of every field below
    experiment      baseline | E0 … E5
    method          none | copy | swap_triplets | swap_directions | sv_only
    donor_role, donor_id, target_role, target_id     roles resolved to ckpt_ids (§1.2)
    k_top, k_tail   the YAML values (int = absolute, float = fraction of each matrix's r)
    k_top_spec, k_tail_spec   their strings as written: "0.2", "1.0", "64"
    layers_spec, layers       E3's layer range as written and resolved (null = every layer)
    modules         module filter (null = every selected module)
    reference_compat          the authors' quirks (§4.2)

Baselines (method `none`, an empty edit) evaluate the unedited donors and targets on the
same hands and protocol, so recovery fractions (§4.4) never mix protocols.
"""

from __future__ import annotations

import logging
import math
from fractions import Fraction

import polars as pl

from rlheal.config import ConfigError, EditVariant, StudyConfig
from tasks.svd.engine import ColumnRequest, column_request as svd_column_request

log = logging.getLogger("rlheal.edit")

EXPERIMENT = {"copy": "E0", "swap_triplets": "E1", "swap_directions": "E2", "sv_only": "E4"}

# ---------------------------------------------------------------------------- §4.3 grids

_TOPS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.625, 0.75, 0.875, 1.0)
_E4_TOPS = (1 / 64, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 7 / 8, 1.0)
_QUARTERS = ("0-0.25", "0.25-0.5", "0.5-0.75", "0.75-1.0", "0-0.5")
# The companion paper's two claims (§4.3): E2 on the top 20 % and E2 at 1.0 on the first quarter.
CLAIM_TOP = 0.2
CLAIM_LAYERS = "0-0.25"


def _v(method: str, k_top, k_tail=0, layers: str | None = None, donor: str = "B", target: str = "S") -> EditVariant:
    return EditVariant(method=method, k_top=k_top, k_tail=k_tail, layers=layers, donor=donor, target=target)


def default_grid() -> list[EditVariant]:
    """The project default (clean mode, fractions of each matrix's r)."""
    e2 = [_v("swap_directions", k) for k in _TOPS]
    e2 += [_v("swap_directions", t, b) for t, b in ((0, 0.05), (0, 0.1), (0, 0.2), (0.1, 0.1), (0.2, 0.2))]
    e1 = [_v("swap_triplets", k) for k in _TOPS] + [_v("swap_triplets", k, k) for k in (0.125, 0.25)]
    e4 = [_v("sv_only", k) for k in _E4_TOPS]
    e3 = [_v(m, 1.0, layers=q) for q in _QUARTERS for m in ("swap_directions", "copy")]
    e5 = [_v("swap_directions", k, donor="S", target="R") for k in (0.2, 1.0)]
    return e2 + e1 + e4 + e3 + e5


def authors_grid(n_layers: int) -> list[EditVariant]:
    """The authors' absolute grid (§4.3 table, run with reference_compat): their layer blocks of
    ten (0-9, 10-19, …; a block past the last layer is clipped, as on Qwen's 28 layers)."""
    e1 = [_v("swap_triplets", k) for k in (2560, 3072, 3584, 4096)]
    e1 += [_v("swap_triplets", t, b) for t, b in ((512, 512), (1024, 1024), (0, 512), (0, 1024), (512, 0), (1024, 0), (100, 100))]
    e1 += [_v("swap_triplets", k, k) for k in (32, 64, 128, 256)] + [_v("swap_triplets", k) for k in (32, 64, 128, 256)]
    e1 += [_v("swap_triplets", 0, k) for k in (32, 64, 128, 256)]
    e2 = [_v("swap_directions", k) for k in (2560, 3072, 3584)]
    e5 = [_v("swap_directions", k, donor="S", target="R") for k in (2560, 3072, 3584)]
    e3 = [_v("swap_directions", 4096, layers=f"{i}-{i + 9}") for i in range(0, n_layers, 10)]
    e4 = [_v("sv_only", k) for k in (64, 256, 512, 768, 1024, 1536, 2048, 2560, 3072, 3584, 4096)]
    singles = [_v("swap_triplets", 800, 800), _v("swap_triplets", 4000, 4000), _v("swap_directions", 4096)]
    return e1 + e2 + e5 + e3 + e4 + singles


def small_grid() -> list[EditVariant]:
    """A handful for tests and the toy study."""
    return [
        _v("swap_directions", CLAIM_TOP), _v("swap_directions", 1.0), _v("swap_triplets", 0.2),
        _v("sv_only", 1.0), _v("swap_directions", 1.0, layers=CLAIM_LAYERS), _v("copy", 1.0),
    ]  # fmt: skip


def templates(cfg: StudyConfig, n_layers: int = 0) -> list[tuple[EditVariant, bool, str]]:
    """(variant, reference_compat, where) of the configured grid then `edit.variants`. The
    authors' grid always runs with their quirks; the fractional grids cannot (quirk 2)."""
    e = cfg.edit
    if e.reference_compat and e.grid in ("default", "small"):
        raise ConfigError(
            f"edit.grid: {e.grid!r} uses fractions of each matrix's rank, which reference_compat rejects "
            "(analysis.md §4.2 quirk 2); use grid: authors, or grid: none with absolute edit.variants"
        )
    grid = {"default": default_grid, "small": small_grid, "authors": lambda: authors_grid(n_layers), "none": list}[e.grid]()
    out = [(v, e.reference_compat or e.grid == "authors", f"edit.grid ({e.grid})") for v in grid]
    return out + [(v, e.reference_compat, f"edit.variants[{i}]") for i, v in enumerate(e.variants)]


# ---------------------------------------------------------------------------- layer ranges (E3)


def resolve_layers(spec: str, n_layers: int) -> list[int]:
    """E3's layer set: comma-separated ranges. Integer ranges are inclusive ("0-9,20-29"); a range
    with a decimal point is a half-open range of fractions of the layer count, boundaries
    floored ("0-0.25" = [0, ⌊L/4⌋)). Indices past the last layer are clipped (the authors ran
    "20-29" on Qwen's 28 layers)."""
    layers: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        lo, sep, hi = part.partition("-")
        lo, hi = lo.strip(), (hi.strip() if sep else lo.strip())
        try:
            if "." in lo or "." in hi:
                a, b = Fraction(lo), Fraction(hi)
                if not (sep and 0 <= a <= b <= 1):
                    raise ValueError
                layers.update(range(math.floor(a * n_layers), math.floor(b * n_layers)))
            else:
                a, b = int(lo), int(hi)
                if not 0 <= a <= b:
                    raise ValueError
                layers.update(range(a, b + 1))
        except ValueError:
            raise ConfigError(
                f"layers {spec!r}: cannot read {part!r}; write inclusive index ranges like '0-9,20-29' "
                "or fractions of the layer count like '0-0.25' (half-open)"
            ) from None
    inside = sorted(i for i in layers if i < n_layers)
    if len(inside) < len(layers):
        log.warning("layers %r: indices past the last layer (%d) ignored", spec, n_layers - 1)
    if not inside:
        log.warning("layers %r selects no layer of a %d-layer model: the variant edits nothing", spec, n_layers)
    return inside


# ---------------------------------------------------------------------------- variants


def k_spec_str(spec: int | float) -> str:
    return repr(spec)


def variant_id(v: dict) -> str:
    """A readable slug of every defining field, e.g. `E2_swap_directions_sft-40_to_sft-80_top0.2_tail0`."""
    if v["method"] == "none":
        parts = [v["experiment"], "none", v["target_id"]]
    else:
        parts = [v["experiment"], v["method"], f"{v['donor_id']}_to_{v['target_id']}", f"top{v['k_top_spec']}", f"tail{v['k_tail_spec']}"]
    if v["layers_spec"] is not None:
        parts.append("L" + v["layers_spec"].replace(" ", "").replace(",", "+"))
    if v["modules"]:
        parts.append("m" + "+".join(v["modules"]))
    if v["reference_compat"]:
        parts.append("compat")
    return "_".join(parts)


def experiment_of(v: EditVariant) -> str:
    if v.layers is not None:
        return "E3"
    if (v.donor, v.target, v.method) == ("S", "R", "swap_directions"):
        return "E5"
    return EXPERIMENT[v.method]


def _finish(v: dict) -> dict:
    return {"variant_id": variant_id(v), **v}


def baseline(role: str, ckpt_id: str, reference_compat: bool) -> dict:
    """An unedited checkpoint evaluated by the edit stage (method `none`)."""
    return _finish({
        "experiment": "baseline", "method": "none", "donor_role": None, "donor_id": None, "target_role": role, "target_id": ckpt_id,
        "k_top": 0, "k_tail": 0, "k_top_spec": "0", "k_tail_spec": "0", "layers_spec": None, "layers": None, "modules": None,
        "reference_compat": reference_compat,
    })  # fmt: skip


def variants(cfg: StudyConfig, roles: pl.DataFrame, n_layers: int) -> list[dict]:
    """The resolved sweep: the grid and `edit.variants` with roles resolved to ckpt_ids, then a
    baseline per donor / target checkpoint. Variants naming R are dropped from the built-in
    grids when no RL run gives R (E5) and are an error in `edit.variants`. Ordered by target,
    so consecutive tasks reuse the model kept in memory."""
    if not cfg.edit.enabled:
        return []
    ids = dict(roles.select("role", "ckpt_id").rows())
    out: dict[str, dict] = {}
    for v, compat, where in templates(cfg, n_layers):
        missing = [r for r in (v.donor, v.target) if r not in ids]
        if missing:
            if where.startswith("edit.variants"):
                raise ConfigError(f"{where}: role {missing[0]} has no checkpoint in this study (roles: {sorted(ids)})")
            continue
        if compat:
            for name in ("k_top", "k_tail"):
                if isinstance(getattr(v, name), float) and v.method != "copy":
                    raise ConfigError(f"{where}.{name}: reference_compat takes absolute k only (quirk 2), got {getattr(v, name)}")
        d = _finish({
            "experiment": experiment_of(v), "method": v.method, "donor_role": v.donor, "donor_id": ids[v.donor],
            "target_role": v.target, "target_id": ids[v.target], "k_top": v.k_top, "k_tail": v.k_tail,
            "k_top_spec": k_spec_str(v.k_top), "k_tail_spec": k_spec_str(v.k_tail), "layers_spec": v.layers,
            "layers": resolve_layers(v.layers, n_layers) if v.layers is not None else None,
            "modules": list(v.modules) if v.modules else None, "reference_compat": compat,
        })  # fmt: skip
        out.setdefault(d["variant_id"], d)
    for d in list(out.values()):
        for role in ("donor", "target"):
            b = baseline(d[f"{role}_role"], d[f"{role}_id"], d["reference_compat"])
            out.setdefault(b["variant_id"], b)
    order = list(dict.fromkeys(d["target_id"] for d in out.values()))
    return sorted(out.values(), key=lambda d: order.index(d["target_id"]))


def column_requests(cfg: StudyConfig) -> dict[str, ColumnRequest]:
    """Role -> the singular vectors the configured sweep reads from that role's checkpoint (a
    donor's or a target's; `copy` reads none), and under reference_compat every 2-D tensor of
    it (quirk 3). The svd stage decomposes these checkpoints with it on top of its own grid,
    so one cache artifact per checkpoint serves measurements and all edits (§4.5.1); every
    other checkpoint keeps only the measurement grid's columns; {} without editing: a
    full-rank edit asks for every column, which on every trajectory checkpoint, delta and
    noise control would cost about twice the model size in fp32 each."""
    if not cfg.edit.enabled:
        return {}
    out: dict[str, ColumnRequest] = {}
    for v, compat, _ in templates(cfg, n_layers=0):
        if v.method == "copy" or not (v.k_top or v.k_tail):
            continue
        own = ColumnRequest(tuple(k for k in [v.k_top] if k), tuple(k for k in [v.k_tail] if k), all_matrices=compat)
        for role in (v.donor, v.target):
            out[role] = out.get(role, ColumnRequest()) | own
    return out


def column_request(cfg: StudyConfig) -> ColumnRequest:
    """Every column any checkpoint of the sweep needs, with the svd stage's own grid (one
    request for a cache that serves a whole sweep's donors and targets alike)."""
    out = svd_column_request(cfg)
    for req in column_requests(cfg).values():
        out = out | req
    return out


def claim_variants(edit_variants: pl.DataFrame) -> dict[str, str | None]:
    """variant_ids of the companion paper's two claims (§4.3), in clean mode:
    `top20_directions` = E2 (B -> S) with k_top 0.2, k_tail 0 on every layer;
    `first_quarter_layers` = E3 on layers_spec "0-0.25" ([0, ⌊L/4⌋)) with E2 at k_top 1.0.
    Filter on experiment too: E5 (S -> R) also has swap_directions at k_top 0.2, and every E3
    quarter has k_top 1.0. None where the sweep lacks the variant."""
    v = edit_variants.filter(pl.col("method") == "swap_directions", ~pl.col("reference_compat"), pl.col("k_tail_spec") == "0")
    top = v.filter(pl.col("experiment") == "E2", pl.col("k_top_spec") == k_spec_str(CLAIM_TOP), pl.col("layers_spec").is_null())
    first = v.filter(pl.col("experiment") == "E3", pl.col("k_top_spec") == "1.0", pl.col("layers_spec") == CLAIM_LAYERS)
    return {"top20_directions": top["variant_id"].first(), "first_quarter_layers": first["variant_id"].first()}
