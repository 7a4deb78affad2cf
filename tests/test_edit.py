"""The edit stage (analysis.md §4, §6, §7): the formulas on random fp64 matrices against
explicit reconstructions, index sets, layer ranges and grids, edits applied in memory to tiny
Llama and Qwen2 models (layer filters, the authors' quirks, bit-identical restore), one SVD per
checkpoint and matrix for a whole sweep, recovery fractions, and a sweep evaluated end to end."""

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from rlheal.config import ConfigError, parse_config
from rlheal.store import Store
from tasks import data, edit, eval, lm, model, svd
from tasks.edit.apply import every_matrix, in_scope
from tasks.edit.sweep import SCHEMAS, schemas, with_recovery
from tasks.svd.metrics import Factors
from tasks.svd.roles import ROLES_SCHEMA
from tests.conftest import GP

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def pair(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A donor and a target that differ like two nearby checkpoints."""
    W_d = torch.randn(m, n, generator=gen(seed), dtype=F64)
    return W_d, W_d + 0.3 * torch.randn(m, n, generator=gen(seed + 1), dtype=F64)


def factors(W: torch.Tensor, top: int | None = None, tail: int = 0) -> Factors:
    return Factors.from_svd(*torch.linalg.svd(W, full_matrices=False), top, tail)


def explicit(method: str, W_t: torch.Tensor, W_d: torch.Tensor, k_top: int, k_tail: int) -> torch.Tensor:
    """W' rebuilt from whole SVDs: the columns in 𝒯 of the target's U, Σ, V replaced."""
    Ut, St, Vht = torch.linalg.svd(W_t, full_matrices=False)
    Ud, Sd, Vhd = torch.linalg.svd(W_d, full_matrices=False)
    r = St.numel()
    T = list(range(k_top)) + list(range(r - k_tail, r))
    U, S, Vh = Ut.clone(), St.clone(), Vht.clone()
    if method in ("swap_triplets", "swap_directions"):
        U[:, T], Vh[T] = Ud[:, T], Vhd[T]
    if method in ("swap_triplets", "sv_only"):
        S[T] = Sd[T]
    return U @ torch.diag(S) @ Vh


# ---------------------------------------------------------------------------- §4.1 formulas


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_swapping_every_triplet_gives_the_donor(shape):
    W_d, W_t = pair(*shape)
    r = min(shape)
    W = edit.edit_matrix("swap_triplets", W_t, W_d, factors(W_t), factors(W_d), r, 0)
    assert rel(W, W_d) < 1e-10


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_full_rank_direction_swap_is_donor_directions_with_target_sigma_and_the_donor_under_compat(shape):
    W_d, W_t = pair(*shape)
    r = min(shape)
    Ud, _, Vhd = torch.linalg.svd(W_d, full_matrices=False)
    St = torch.linalg.svdvals(W_t)
    clean = edit.edit_matrix("swap_directions", W_t, W_d, factors(W_t), factors(W_d), r, 0)
    assert rel(clean, Ud @ torch.diag(St) @ Vhd) < 1e-10 and rel(clean, W_d) > 1e-3
    # quirk 1: at |𝒯| = r every method is an exact copy of the donor (here via k_top + k_tail = r)
    for method in ("swap_directions", "sv_only", "swap_triplets"):
        assert edit.edit_matrix(method, W_t, W_d, factors(W_t), factors(W_d), r - 3, 3, reference_compat=True) is W_d


def test_full_rank_singular_value_restore_keeps_the_target_vectors():
    W_d, W_t = pair(20, 12)
    Ut, _, Vht = torch.linalg.svd(W_t, full_matrices=False)
    W = edit.edit_matrix("sv_only", W_t, W_d, factors(W_t), factors(W_d), 12, 0)
    assert rel(W, Ut @ torch.diag(torch.linalg.svdvals(W_d)) @ Vht) < 1e-10


@pytest.mark.parametrize("method", ["swap_triplets", "swap_directions", "sv_only"])
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
@pytest.mark.parametrize("ks", [(3, 0), (0, 2), (2, 3), (6, 6), (30, 0), (10, 10)])
def test_partial_edits_equal_explicit_reconstructions(method, shape, ks):
    W_d, W_t = pair(*shape, seed=7)
    k_top, k_tail = edit.index_set(*ks, r=min(shape))
    # only the columns the index set needs are "cached", as in a `columns: needed` cache
    f_t, f_d = factors(W_t, k_top, k_tail), factors(W_d, k_top, k_tail)
    W = edit.edit_matrix(method, W_t, W_d, f_t, f_d, k_top, k_tail)
    assert rel(W, explicit(method, W_t, W_d, k_top, k_tail)) < 1e-10


def flip(f: Factors, signs: torch.Tensor, v: bool = True) -> Factors:
    """The same SVD with (u_i, v_i) -> (s_i u_i, s_i v_i) (v=False: u_i alone, not an SVD any more)."""
    top, tail = signs[: f.n_top], signs[f.r - f.n_tail :]
    return Factors(f.S, f.U_top * top, f.V_top * top if v else f.V_top, f.U_tail * tail, f.V_tail * tail if v else f.V_tail, f.m, f.n)


@pytest.mark.parametrize("method", ["swap_triplets", "swap_directions", "sv_only"])
@pytest.mark.parametrize("ks", [(3, 0), (2, 3), (12, 0)])
def test_edits_do_not_depend_on_the_signs_of_singular_pairs(method, ks):
    """§4.1: u and v are swapped jointly, so an SVD whose pairs (u_i, v_i) are flipped jointly
    (another valid SVD of the same matrix, as another LAPACK build may return) gives the same
    W'. Flipping u_i alone is not an SVD of W, and the edit sees it."""
    W_d, W_t = pair(20, 12, seed=3)
    k_top, k_tail = edit.index_set(*ks, r=12)
    f_t, f_d = factors(W_t, k_top, k_tail), factors(W_d, k_top, k_tail)
    s_t = torch.where(torch.rand(12, generator=gen(5)) < 0.5, -1.0, 1.0).to(F64)
    s_d = torch.where(torch.rand(12, generator=gen(6)) < 0.5, -1.0, 1.0).to(F64)
    s_t[0] = s_d[0] = s_t[-1] = s_d[-1] = -1.0  # at least the first top and the last tail index flipped on both sides
    for g_t, g_d in ((flip(f_t, s_t), f_d), (f_t, flip(f_d, s_d)), (flip(f_t, s_t), flip(f_d, s_d))):
        # the flipped factors still reconstruct their matrix: a valid SVD, not a different one
        U, S, V = edit.formulas.triplets(g_t, k_top, k_tail)
        U0, _, V0 = edit.formulas.triplets(f_t, k_top, k_tail)
        assert torch.allclose((U * S) @ V.mT, (U0 * S) @ V0.mT, rtol=0, atol=1e-12)
        same = edit.edit_matrix(method, W_t, W_d, g_t, g_d, k_top, k_tail)
        assert rel(same, edit.edit_matrix(method, W_t, W_d, f_t, f_d, k_top, k_tail)) < 1e-13
    # flipping u without its v: target side for every method (sv_only reads only the target's vectors)
    broken = edit.edit_matrix(method, W_t, W_d, flip(f_t, s_t, v=False), f_d, k_top, k_tail)
    assert rel(broken, edit.edit_matrix(method, W_t, W_d, f_t, f_d, k_top, k_tail)) > 1e-2
    if method != "sv_only":
        broken = edit.edit_matrix(method, W_t, W_d, f_t, flip(f_d, s_d, v=False), k_top, k_tail)
        assert rel(broken, edit.edit_matrix(method, W_t, W_d, f_t, f_d, k_top, k_tail)) > 1e-2


@pytest.mark.parametrize("method", ["swap_triplets", "swap_directions", "sv_only"])
def test_an_empty_index_set_changes_nothing(method):
    W_d, W_t = pair(12, 20)
    for compat in (False, True):
        W = edit.edit_matrix(method, W_t, W_d, None, None, 0, 0, reference_compat=compat)
        assert W is W_t


def test_index_sets_clamp_and_k_specs_resolve_per_matrix():
    assert [edit.resolve_edit_k(k, 16) for k in (0.2, 1.0, 0.01, 0, 4096)] == [3, 16, 1, 0, 4096]
    assert edit.index_set(4096, 0, 1024) == (1024, 0)  # the authors' 4096 on a Llama k/v matrix
    assert edit.index_set(512, 512, 1024) == (512, 512)
    assert edit.index_set(10, 10, 16) == (10, 6)
    assert edit.index_set(0, 40, 16) == (0, 16)


def test_reference_compat_rejects_fractions():
    with pytest.raises(ConfigError, match="quirk 2"):
        edit.resolve_edit_k(0.2, 16, reference_compat=True)
    with pytest.raises(ConfigError, match=r"edit.variants\[0\].k_top: .*quirk 2"):
        parse_config({"name": "t", "edit": {"reference_compat": True, "variants": [{"k_top": 0.5}]}})
    cfg = parse_config({"name": "t", "edit": {"reference_compat": True}})
    with pytest.raises(ConfigError, match="edit.grid: 'default' uses fractions"):
        edit.variants(cfg, roles_table(), 4)


# ---------------------------------------------------------------------------- §4.1 E3, §4.3 grids


def test_layer_ranges():
    assert edit.resolve_layers("0-9,20-29", 40) == list(range(10)) + list(range(20, 30))
    assert edit.resolve_layers("0-0.25", 40) == list(range(10))
    assert [edit.resolve_layers(q, 4) for q in ("0-0.25", "0.25-0.5", "0.5-0.75", "0.75-1.0", "0-0.5")] == [[0], [1], [2], [3], [0, 1]]
    assert edit.resolve_layers("0-0.25", 2) == []  # floor(2/4) = 0: an empty first quarter
    assert edit.resolve_layers("20-29", 28) == list(range(20, 28))  # the authors' Qwen block, clipped
    assert edit.resolve_layers("3", 4) == [3]
    for bad in ("9-0", "a-b", "0.5", "0-1.5"):
        with pytest.raises(ConfigError, match="layers"):
            edit.resolve_layers(bad, 10)


def roles_table(r: bool = True) -> pl.DataFrame:
    roles = [("base", "base", "base", 0), ("B", "sft-4", "sft", 4), ("S", "sft-8", "sft", 8)] + ([("R", "rl-5", "rl", 5)] if r else [])
    return pl.DataFrame([{"role": a, "ckpt_id": c, "stage": s, "step": k} for a, c, s, k in roles], schema={k: ROLES_SCHEMA[k] for k in ("role", "ckpt_id", "stage", "step")})


def test_grids_resolve_roles_and_give_unique_deterministic_ids():
    cfg = parse_config({"name": "t"})
    full = edit.variants(cfg, roles_table(), 40)
    assert len(full) == 14 + 11 + 11 + 10 + 2 + 3 and full == edit.variants(cfg, roles_table(), 40)
    assert len({v["variant_id"] for v in full}) == len(full)
    no_r = edit.variants(cfg, roles_table(r=False), 40)
    assert {v["experiment"] for v in no_r} == {"baseline", "E1", "E2", "E3", "E4"} and len(no_r) == len(full) - 3
    e5 = [v for v in full if v["experiment"] == "E5"]
    assert {(v["donor_id"], v["target_id"], v["method"], v["k_top_spec"]) for v in e5} == {("sft-8", "rl-5", "swap_directions", "0.2"), ("sft-8", "rl-5", "swap_directions", "1.0")}
    assert {v["variant_id"] for v in full if v["method"] == "none"} == {"baseline_none_sft-4", "baseline_none_sft-8", "baseline_none_rl-5"}

    small = edit.variants(parse_config({"name": "t", "edit": {"grid": "small"}}), roles_table(), 4)
    assert [v["variant_id"] for v in small] == [
        "E2_swap_directions_sft-4_to_sft-8_top0.2_tail0", "E2_swap_directions_sft-4_to_sft-8_top1.0_tail0",
        "E1_swap_triplets_sft-4_to_sft-8_top0.2_tail0", "E4_sv_only_sft-4_to_sft-8_top1.0_tail0",
        "E3_swap_directions_sft-4_to_sft-8_top1.0_tail0_L0-0.25", "E0_copy_sft-4_to_sft-8_top1.0_tail0",
        "baseline_none_sft-8", "baseline_none_sft-4",
    ]  # fmt: skip
    claims = edit.claim_variants(pl.DataFrame(small).select(pl.exclude("layers", "modules")))
    assert claims == {"top20_directions": small[0]["variant_id"], "first_quarter_layers": small[4]["variant_id"]}

    authors = edit.variants(parse_config({"name": "t", "edit": {"grid": "authors"}}), roles_table(), 40)
    assert all(v["reference_compat"] for v in authors) and all(isinstance(v["k_top"], int) for v in authors)
    assert [v["layers_spec"] for v in authors if v["experiment"] == "E3"] == ["0-9", "10-19", "20-29", "30-39"]
    with pytest.raises(ConfigError, match=r"edit.variants\[0\]: role R has no checkpoint"):
        edit.variants(parse_config({"name": "t", "edit": {"grid": "none", "variants": [{"donor": "S", "target": "R"}]}}), roles_table(r=False), 4)


# ---------------------------------------------------------------------------- §4.4 recovery


def outcomes(solved: int, n: int = 100, seed: int = 0) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[np.random.default_rng(seed).permutation(n)[:solved]] = True
    return out


def test_recovery_fraction_and_its_paired_bootstrap():
    t, d = outcomes(20, seed=1), outcomes(80, seed=2)
    e = outcomes(62, seed=3)
    rec = edit.paired_bootstrap(e, d, t, resamples=2000, seed=0)
    assert rec.rho == pytest.approx(0.7) and rec.gap_significant and rec.no_gap_share == 0
    assert rec.ci_low < 0.7 < rec.ci_high and rec.ci_high - rec.ci_low < 0.4
    assert edit.paired_bootstrap(e, d, t, 2000, 0) == rec  # seeded
    # a 2-hand gap on 100 hands: many resamples reverse it -> not significant, no interval
    weak = edit.paired_bootstrap(outcomes(51, seed=3), outcomes(52, seed=2), outcomes(50, seed=1), 2000, 0)
    assert weak.rho is not None and not weak.gap_significant and weak.ci_low is None and weak.ci_high is None and weak.no_gap_share > 0.025
    # no gap at all: rho is null
    assert edit.paired_bootstrap(e, t, d, 2000, 0).rho is None and edit.recovery_fraction(0.5, 0.3, 0.3) is None
    # E5: RL at 0.8, SFT end at 0.2, edited RL model at 0.5 -> half the RL gain destroyed
    assert edit.damage_fraction(0.5, 0.2, 0.8) == pytest.approx(0.5) and edit.damage_fraction(0.5, 0.8, 0.2) is None


def test_recovery_columns_come_from_the_same_protocol_baselines():
    vids = {"bd": ("none", None, "B"), "bs": ("none", None, "S"), "e2": ("swap_directions", "B", "S"), "e2c": ("swap_directions", "B", "S")}
    variants = pl.DataFrame(
        [{"variant_id": v, "experiment": "baseline" if m == "none" else "E2", "method": m, "donor_id": d, "target_id": t, "reference_compat": v == "e2c"} for v, (m, d, t) in vids.items()]
    )
    solved = {"bd": outcomes(80, seed=2), "bs": outcomes(20, seed=1), "e2": outcomes(62, seed=3), "e2c": outcomes(62, seed=3)}
    attempts = pl.DataFrame(
        [{"variant_id": v, "split": "OOD", "hand_index": i, "attempt": 1, "reward": 5.0 if s[i] else -1.0} for v, s in solved.items() for i in range(100)]
    )
    results = pl.DataFrame([{"variant_id": v, "split": "OOD", "accuracy": float(solved[v].mean())} for v in vids])
    results = pl.DataFrame({k: results[k] if k in results.columns else pl.Series(k, [None] * 4, dtype=t) for k, t in SCHEMAS["edit_eval_results"].items()})
    out = {r["variant_id"]: r for r in with_recovery(results, variants, attempts, 2000, 0, GP).to_dicts()}
    assert out["e2"]["recovery_fraction"] == pytest.approx(0.7) and out["e2"]["gap_significant"]
    assert (out["e2"]["donor_accuracy"], out["e2"]["target_accuracy"]) == (0.8, 0.2)
    assert out["bs"]["target_accuracy"] == 0.2 and out["bs"]["donor_accuracy"] is None and not out["bs"]["gap_significant"]
    # a reference_compat variant has no compat baselines here: nothing is mixed across protocols
    assert out["e2c"]["recovery_fraction"] is None and out["e2c"]["target_accuracy"] is None


def test_no_gap_between_donor_and_target_leaves_recovery_null_for_the_right_reason():
    """§4.4: ρ is null when acc_d <= acc_t, with nonzero accuracies: equal (40 % and 40 %, on
    different hands) and inverted (donor 30 % < target 60 %), while the edited model's 50 %
    would give ρ = 0.5 or ρ = -1/3 to a formula that ignored the rule. A real gap on the same
    hands (donor 70 %) gives ρ and its interval: the null is the rule, not missing data."""
    cases = {"equal": (40, 40), "inverted": (30, 60), "gap": (70, 30)}  # (donor, target) solved of 100
    vids = {}
    for name in cases:
        vids |= {f"d_{name}": ("none", None, f"B_{name}"), f"t_{name}": ("none", None, f"S_{name}"), f"e_{name}": ("swap_directions", f"B_{name}", f"S_{name}")}
    variants = pl.DataFrame(
        [{"variant_id": v, "experiment": "baseline" if m == "none" else "E2", "method": m, "donor_id": d, "target_id": t, "reference_compat": False} for v, (m, d, t) in vids.items()]
    )
    solved = {}
    for i, (name, (d, t)) in enumerate(cases.items()):
        solved |= {f"d_{name}": outcomes(d, seed=10 + i), f"t_{name}": outcomes(t, seed=20 + i), f"e_{name}": outcomes(50, seed=30 + i)}
    assert not np.array_equal(solved["d_equal"], solved["t_equal"])  # equal accuracy, different hands
    attempts = pl.DataFrame(
        [{"variant_id": v, "split": "OOD", "hand_index": i, "attempt": 1, "reward": 5.0 if s[i] else -1.0} for v, s in solved.items() for i in range(100)]
    )
    results = pl.DataFrame([{"variant_id": v, "split": "OOD", "accuracy": float(solved[v].mean())} for v in vids])
    results = pl.DataFrame({k: results[k] if k in results.columns else pl.Series(k, [None] * results.height, dtype=t) for k, t in SCHEMAS["edit_eval_results"].items()})
    out = {r["variant_id"]: r for r in with_recovery(results, variants, attempts, 2000, 0, GP).to_dicts()}
    for name, (d, t) in cases.items():
        row = out[f"e_{name}"]
        assert (row["donor_accuracy"], row["target_accuracy"], row["accuracy"]) == (d / 100, t / 100, 0.5), name
        if name == "gap":
            assert row["recovery_fraction"] == pytest.approx(0.5) and row["gap_significant"] and row["recovery_ci_low"] < 0.5 < row["recovery_ci_high"]
        else:
            assert row["recovery_fraction"] is None and not row["gap_significant"], name
            assert row["recovery_ci_low"] is None and row["recovery_ci_high"] is None, name
    # the same at the level of the bootstrap: the resamples see no gap either
    equal = edit.paired_bootstrap(solved["e_equal"], solved["d_equal"], solved["t_equal"], 2000, 0)
    inverted = edit.paired_bootstrap(solved["e_inverted"], solved["d_inverted"], solved["t_inverted"], 2000, 0)
    assert equal.rho is None and equal.no_gap_share > 0.3 and inverted.rho is None and inverted.no_gap_share > 0.99


# ---------------------------------------------------------------------------- tiny models in memory

TINY = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}
CFG = {
    "name": "t",
    "model": {"builtin": "tiny", "tiny": TINY},
    "data": {"train_size": 64, "eval_size": 6},
    "sft": {"save_steps": [0, 1], "batch_size": 8, "per_device_batch_size": 8},
    "eval": {"batch_size": 64, "ce_hands": 4, "decoding": {"max_new_tokens": 24}},
    "edit": {"grid": "none"},
}


def perturbed(tensors: dict, seed: int, scale: float = 0.1) -> dict:
    g = gen(seed)
    return {k: v + scale * v.std() * torch.randn(v.shape, generator=g) for k, v in tensors.items()}


def save_like(base: Path, out: Path, tensors: dict) -> Path:
    shutil.copytree(base, out)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def checkpoints_table(dirs: dict[str, Path]) -> pl.DataFrame:
    rows = [
        {"ckpt_id": c, "stage": c.split("-")[0], "step": int(c.split("-")[1]), "parent": "base", "path": str(p), "content_hash": lm.weights_hash(p)}
        for c, p in dirs.items()
    ]
    return pl.DataFrame(rows, schema_overrides={"step": pl.Int32})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny tied-embedding Llama: donor sft-4 and target sft-8 differ in every tensor, 1-D included."""
    root = tmp_path_factory.mktemp("edit")
    cfg = parse_config(CFG)
    base = root / "base"
    model.build_tiny(base, cfg)
    w0 = load_file(base / "model.safetensors")
    dirs = {"sft-4": save_like(base, root / "sft-4", perturbed(w0, 4)), "sft-8": save_like(base, root / "sft-8", perturbed(w0, 8))}
    return root, cfg, checkpoints_table(dirs)


def rows_of(ckpts: pl.DataFrame) -> dict[str, dict]:
    return {r["ckpt_id"]: r for r in ckpts.to_dicts()}


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def variant(cfg, roles=None, **fields) -> dict:
    cfg = parse_config(cfg.model_dump() | {"edit": {"grid": "none", "variants": [fields]}})
    return next(v for v in edit.variants(cfg, roles if roles is not None else roles_table(), 4) if v["method"] != "none")


def test_layer_filter_touches_exactly_the_named_layers_and_restore_is_bit_identical(llama, tmp_path):
    root, cfg, ckpts = llama
    rows = rows_of(ckpts)
    v = variant(cfg, method="swap_directions", k_top=1.0, layers="1-2")
    assert v["layers"] == [1, 2] and v["experiment"] == "E3"
    with edit.resident(rows["sft-8"], torch.float32) as loaded:
        before = state(loaded.model)
        with edit.applied(Store(tmp_path), cfg, v, loaded, rows["sft-8"], rows["sft-4"]) as log:
            during = state(loaded.model)
        after = state(loaded.model)
        assert edit.fingerprint(loaded.model) == loaded.fingerprint
    assert {r["layer"] for r in log} == {1, 2} and len(log) == 14 and all(r["full_reset"] for r in log)
    changed = {k for k in before if not torch.equal(before[k], during[k])}
    assert changed == {r["param"] for r in log}  # every other tensor, 1-D ones included, bit for bit
    assert all(torch.equal(before[k], after[k]) for k in before)
    # clean E2 at full rank: U_d Σ_t V_dᵀ, computed in fp64 and cast once to fp32
    q = "model.layers.1.self_attn.q_proj.weight"
    Wd, Wt = (load_file(Path(rows[c]["path"]) / "model.safetensors")[q].double() for c in ("sft-4", "sft-8"))
    Ud, _, Vhd = torch.linalg.svd(Wd, full_matrices=False)
    assert rel(during[q].double(), Ud @ torch.diag(torch.linalg.svdvals(Wt)) @ Vhd) < 1e-6
    # an empty index set writes nothing
    with edit.resident(rows["sft-8"], torch.float32) as loaded:
        with edit.applied(Store(tmp_path), cfg, variant(cfg, method="swap_triplets", k_top=0, k_tail=0), loaded, rows["sft-8"], rows["sft-4"]) as log:
            assert all(torch.equal(before[k], t) for k, t in state(loaded.model).items())
    assert len(log) == 28 and {r["n_indices"] for r in log} == {0} and {r["rel_change_vs_target"] for r in log} == {0.0}


def test_a_failed_restore_check_is_an_error(llama, tmp_path):
    _, cfg, ckpts = llama
    rows = rows_of(ckpts)
    with pytest.raises(RuntimeError, match="not bit-identical"):
        with edit.resident(rows["sft-8"], torch.float32) as loaded:
            with edit.applied(Store(tmp_path), cfg, variant(cfg, method="copy", layers="0"), loaded, rows["sft-8"], rows["sft-4"]):
                loaded.params["model.norm.weight"].data[0] += 1  # an unselected tensor changed behind the stage's back


def test_compat_full_rank_is_the_donor_in_float16_and_quirks_3_and_4_on_llama(llama, tmp_path):
    root, cfg, ckpts = llama
    rows = rows_of(ckpts)
    donor = load_file(Path(rows["sft-4"]["path"]) / "model.safetensors")
    # quirk 3: every 2-D parameter (the tied embedding once); quirk 1: 64 >= every r -> the donor
    v = variant(cfg, method="swap_directions", k_top=64)
    v["reference_compat"] = True
    with edit.resident(rows["sft-8"], torch.float16) as loaded:
        with edit.applied(Store(tmp_path), cfg, v, loaded, rows["sft-8"], rows["sft-4"]) as log:
            for r in log:
                assert torch.equal(loaded.params[r["param"]], donor[r["param"]].half()), r["param"]
            assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert [r["param"] for r in log if r["layer"] == -1] == ["model.embed_tokens.weight"] and len(log) == 29
    assert all(r["compat_early_exit"] and r["rel_dist_to_donor"] < 1e-3 for r in log)
    # quirk 4: a llama layer-range edit also takes the embedding (and lm_head, tied here)
    v = variant(cfg, method="swap_directions", k_top=64, layers="1-1")
    v["reference_compat"] = True
    scope = in_scope(v, every_matrix(rows["sft-8"]["path"]), "llama")
    assert {m.layer for m in scope} == {-1, 1} and "model.embed_tokens.weight" in {m.param for m in scope}
    clean = in_scope(v | {"reference_compat": False}, svd.select_matrices(rows["sft-8"]["path"], cfg.svd), "llama")
    assert {m.layer for m in clean} == {1}


def test_compat_layer_range_leaves_qwen2_embeddings_alone(llama, tmp_path):
    root, cfg, ckpts = llama
    tok = model.build_tokenizer(GP)
    qcfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    dirs = {}
    for c in ("sft-4", "sft-8"):
        dirs[c] = tmp_path / c
        Qwen2ForCausalLM(qcfg).save_pretrained(dirs[c], safe_serialization=True)
        tok.save_pretrained(dirs[c])
    rows = rows_of(checkpoints_table(dirs))
    v = variant(cfg, method="swap_directions", k_top=64, layers="0-0")
    v["reference_compat"] = True
    with edit.resident(rows["sft-8"], torch.float16) as loaded:
        before = state(loaded.model)
        with edit.applied(Store(tmp_path / "store"), cfg, v, loaded, rows["sft-8"], rows["sft-4"]) as log:
            during = state(loaded.model)
    assert {r["layer"] for r in log} == {0} and len(log) == 7
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.bias"):
        assert torch.equal(before[name], during[name])
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"], during["model.layers.0.self_attn.q_proj.weight"])


def test_a_sweep_decomposes_each_checkpoint_matrix_once(llama, tmp_path):
    _, cfg, ckpts = llama
    rows = rows_of(ckpts)
    grid = [{"method": "swap_directions", "k_top": 0.2}, {"method": "swap_triplets", "k_top": 0.1, "k_tail": 0.1}, {"method": "sv_only", "k_top": 0.5},
            {"method": "swap_directions", "k_top": 0, "k_tail": 0.25}, {"method": "copy", "layers": "0-0.5"}]  # fmt: skip
    cfg = parse_config(cfg.model_dump() | {"edit": {"grid": "none", "variants": grid}})
    store = Store(tmp_path)
    svd.SVD_CALLS.clear()
    for v in edit.variants(cfg, roles_table(), 4):
        with edit.resident(rows[v["target_id"]], torch.float32) as loaded:
            with edit.applied(store, cfg, v, loaded, rows[v["target_id"]], rows.get(v["donor_id"])):
                pass
    n_mats = 4 * 7
    assert len(svd.SVD_CALLS) == 2 * n_mats and set(svd.SVD_CALLS.values()) == {1}
    assert {c for c, _ in svd.SVD_CALLS} == {"sft-4", "sft-8"}


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sweep(llama):
    """Three variants and the two baselines, edited in memory and evaluated on 6 + 6 hands."""
    root, cfg, ckpts = llama
    grid = [{"method": "swap_directions", "k_top": 0.2}, {"method": "swap_directions", "k_top": 1.0, "layers": "0-0.25"}, {"method": "copy"}]
    cfg = parse_config(CFG | {"edit": {"grid": "none", "variants": grid, "keep_checkpoints": True, "bootstrap_resamples": 200}})
    store = Store(root / "store")
    data_dir = Path(data.run(store, cfg))
    (root / "ckpts").mkdir()
    ckpts.write_parquet(root / "ckpts" / "checkpoints.parquet")
    roles_table(r=False).write_parquet(root / "ckpts" / "checkpoint_roles.parquet")
    svd.SVD_CALLS.clear()
    out = edit.run(store, cfg, roles_table(r=False), ckpts, data_dir)
    calls = dict(svd.SVD_CALLS)
    return store, cfg, ckpts, data_dir, out, calls


def test_sweep_writes_the_three_tables_with_their_types(sweep):
    store, cfg, ckpts, data_dir, out, calls = sweep
    t = {name: pl.read_parquet(out / f"{name}.parquet") for name in edit.STAGE.tables}
    for name, schema in schemas(GP).items():  # all four tables, attempts with the task's columns
        assert t[name].schema == pl.Schema(schema), name
    assert set(calls.values()) == {1} and len(calls) == 2 * 28

    v = t["edit_variants"].sort("variant_id")
    assert v["variant_id"].to_list() == [
        "E0_copy_sft-4_to_sft-8_top1.0_tail0", "E2_swap_directions_sft-4_to_sft-8_top0.2_tail0",
        "E3_swap_directions_sft-4_to_sft-8_top1.0_tail0_L0-0.25", "baseline_none_sft-4", "baseline_none_sft-8",
    ]  # fmt: skip
    assert v["n_matrices_selected"].to_list() == [28, 28, 7, 0, 0] and v["n_full_reset"].to_list() == [28, 0, 7, 0, 0]
    assert v["layers"].to_list()[2] == [0] and v["saved"].to_list() == [True, True, True, False, False]
    assert v["model_dtype"].unique().to_list() == ["float32"] and not v["edit_embeddings"].any()
    assert v["run_id"].unique().to_list() == ["t"] and v["model_name"].unique().to_list() == ["builtin:tiny"]
    assert edit.claim_variants(v) == {"top20_directions": v["variant_id"][1], "first_quarter_layers": v["variant_id"][2]}

    ml = t["edit_matrix_log"]
    e2 = ml.filter(pl.col("variant_id") == v["variant_id"][1])
    k = e2.filter(pl.col("module") == "k").row(0, named=True)  # 16 x 32: 0.2 -> 3 indices
    assert (k["rank"], k["k_top_eff"], k["k_tail_eff"], k["n_indices"], k["full_reset"]) == (16, 3, 0, 3, False)
    copy = ml.filter(pl.col("variant_id") == v["variant_id"][0])
    assert (copy["rel_dist_to_donor"] == 0).all() and (copy["rel_change_vs_target"] > 0).all()

    res = t["edit_eval_results"]
    assert res.height == 10 and set(res["split"]) == {"ID", "OOD"} and (res["n_hands"] == 6).all()
    assert res.filter(pl.col("variant_id").str.starts_with("baseline"))["donor_accuracy"].is_null().all()
    edits = res.filter(~pl.col("variant_id").str.starts_with("baseline"))
    assert edits["donor_accuracy"].is_not_null().all() and edits["target_accuracy"].is_not_null().all()
    # an untrained model solves nothing (0 = 0: ρ null); test_no_gap_... has the real no-gap cases
    assert (res["accuracy"] == 0).all() and edits["recovery_fraction"].is_null().all() and not edits["gap_significant"].any()
    att = t["edit_eval_attempts"]
    assert att.group_by("variant_id", "split").agg(pl.col("hand_index").n_unique())["hand_index"].to_list() == [6] * 10


def test_an_edited_checkpoint_loads_and_evaluates_like_the_in_memory_edit(sweep):
    store, cfg, ckpts, data_dir, out, _ = sweep
    [v] = [v for v in edit.plan(cfg, roles_table(r=False), ckpts) if v["experiment"] == "E2"]
    [path] = [p for p in (store.root / "edit").glob("*/checkpoint") if store.manifest(p.parent).get("variant_id") == v["variant_id"]]
    sha = pl.read_parquet(out / "edit_variants.parquet").filter(pl.col("variant_id") == v["variant_id"])["weights_sha256"].item()
    assert lm.weights_hash(path) == sha
    hands = pl.read_parquet(data_dir / "eval_set_ood.parquet")
    rows = rows_of(ckpts)
    with edit.resident(rows["sft-8"], torch.float32) as loaded:
        with edit.applied(store, cfg, v, loaded, rows["sft-8"], rows["sft-4"]):
            in_memory = state(loaded.model)
            ce = lm.reference_ce(loaded.model, loaded.tok, hands, cfg.eval.ce_hands, cfg.chat.date_string)
    model, tok = lm.load_model(path), lm.load_tokenizer(path)
    assert all(torch.equal(in_memory[k], t) for k, t in model.state_dict().items())
    attempts, summary = eval.evaluate_model(model, tok, hands, cfg, {"ckpt_id": "sft-8"})
    assert summary["ce"][0] == pytest.approx(ce, rel=1e-6)
    stored = pl.read_parquet(out / "edit_eval_attempts.parquet").filter(pl.col("variant_id") == v["variant_id"], pl.col("split") == "OOD")
    cols = ["hand_index", "attempt", "response", "generated_tokens"]
    assert attempts.select(cols).sort("hand_index", "attempt").equals(stored.select(cols).sort("hand_index", "attempt"))


def test_prefect_task_is_cached_by_artifact_and_honours_fault_injection(sweep, monkeypatch):
    from rlheal.faults import InjectedFault

    store, cfg, ckpts, data_dir, out, _ = sweep
    roles_path = Path(ckpts["path"][0]).parent / "ckpts"
    [v] = [v for v in edit.plan(cfg, roles_table(r=False), ckpts) if v["experiment"] == "E0"]
    art = edit.artifact(store, cfg, v, ckpts, data_dir)
    kwargs = dict(artifact=art, cfg=cfg, variant=v, roles=str(roles_path), checkpoints=str(roles_path / "checkpoints.parquet"), data=str(data_dir))
    assert store.is_sealed(art)
    assert edit.stage.fn(**kwargs) == str(art.path)  # found sealed: nothing recomputed
    monkeypatch.setenv("RLHEAL_FAULT", "edit")
    with pytest.raises(InjectedFault):
        edit.stage.fn(**kwargs)
    # another target (a moved role) is refused rather than silently evaluated under the old id
    moved = roles_table(r=False).with_columns(ckpt_id=pl.when(pl.col("role") == "S").then(pl.lit("sft-4")).otherwise(pl.col("ckpt_id")))
    monkeypatch.delenv("RLHEAL_FAULT")
    with pytest.raises(ValueError, match="plan the sweep again"):
        edit.run_variant(store, cfg, v, moved, ckpts, data_dir)
