"""The svd stage (analysis.md §1-§3, §6, §7): the formulas against scipy and planted answers,
the decompose-once cache, role selection, and a whole run on tiny checkpoints."""

import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file, save_file

from rlheal.config import ConfigError, RolesSection, parse_config
from rlheal.store import Store
from tasks import lm, model, svd
from tasks.svd import metrics as M
from tasks.svd.analysis import ANGLES_SCHEMA, CORRELATIONS_SCHEMA, PAIR_SCHEMA, SPECTRA_SCHEMA, VS_ACCURACY_SCHEMA
from tasks.svd.engine import decompose
from tasks.svd.roles import ROLES_SCHEMA, select_b

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, k, generator=gen(seed), dtype=F64)).Q


def factorize(W: torch.Tensor) -> M.Factors:
    return M.Factors.from_svd(*torch.linalg.svd(W, full_matrices=False))


def planted(d: int, thetas: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Qb = Qa cos(Theta) + Q_perp sin(Theta): the principal angles are exactly Theta."""
    k = len(thetas)
    Q = orthonormal(d, 2 * k, seed)
    t = torch.tensor(thetas, dtype=F64)
    return Q[:, :k], Q[:, :k] * torch.cos(t) + Q[:, k:] * torch.sin(t)


# ---------------------------------------------------------------------------- §3.3 principal angles


@pytest.mark.parametrize("case", ["random", "shared", "close", "orthogonal", "mixed"])
def test_angles_agree_with_scipy(case):
    d, k = 40, 6
    Qa = orthonormal(d, k, 1)
    if case == "random":
        Qb = orthonormal(d, k, 2)
    elif case == "shared":  # three common directions: three exact zeros
        Qb = torch.linalg.qr(torch.cat([Qa[:, :3], torch.randn(d, 3, generator=gen(3), dtype=F64)], 1)).Q
    elif case == "close":
        Qb = torch.linalg.qr(Qa + 1e-4 * torch.randn(d, k, generator=gen(4), dtype=F64)).Q
    elif case == "orthogonal":
        Q = orthonormal(d, 2 * k, 5)
        Qa, Qb = Q[:, :k], Q[:, k:]
    else:
        Qa, Qb = planted(d, [0.0, 1e-5, 0.3, 0.78, 0.79, 1.5], seed=6)
    ours = M.principal_angles(Qa, Qb).numpy()
    ref = np.sort(scipy.linalg.subspace_angles(Qa.numpy(), Qb.numpy()))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-7)
    assert np.all(np.diff(ours) >= 0) and ours.min() >= 0 and ours.max() <= math.pi / 2 + 1e-15


def test_planted_angles_recovered_to_1e_12_in_fp64_and_1e_6_in_fp32():
    thetas = [1e-9, 1e-6, 1e-3, 0.1, math.pi / 4 - 1e-3, math.pi / 4 + 1e-3, 1.2, math.pi / 2 - 1e-6, math.pi / 2 - 1e-9]
    Qa, Qb = planted(50, thetas, seed=7)
    got = M.principal_angles(Qa, Qb).numpy()
    np.testing.assert_allclose(got, sorted(thetas), rtol=0, atol=1e-12)
    got32 = M.principal_angles(Qa.float(), Qb.float()).double().numpy()
    np.testing.assert_allclose(got32, sorted(thetas), rtol=0, atol=1e-6)
    # the cosine method alone cannot see 1e-9 or 1e-6 rad: why the combined rule exists
    assert M.principal_angles_cos(Qa, Qb)[0] == 0.0


def test_k_at_or_above_rank_raises():
    fa, fb = factorize(torch.randn(16, 32, generator=gen(1), dtype=F64)), factorize(torch.randn(16, 32, generator=gen(2), dtype=F64))
    with pytest.raises(ValueError, match=r"k >= min\(m,n\)"):
        M.top_k_angles(fa, fb, 16)
    with pytest.raises(ValueError, match=r"k >= min\(m,n\)"):
        M.principal_angles(orthonormal(8, 8, 1), orthonormal(8, 8, 2))
    assert len(M.top_k_angles(fa, fb, 15)[0]) == 15


def test_more_than_half_the_dimension_forces_zero_angles():
    d, k = 10, 7
    theta = M.principal_angles(orthonormal(d, k, 1), orthonormal(d, k, 2))
    assert M.n_forced_zero(k, d) == 4
    assert (theta < 1e-6).sum() >= 4


def test_chordal_and_proj_dist_from_angles_equal_the_projector_norm():
    Qa, Qb = orthonormal(12, 4, 1), orthonormal(12, 4, 2)
    theta = M.principal_angles(Qa, Qb)
    explicit = torch.linalg.matrix_norm(Qa @ Qa.T - Qb @ Qb.T)
    assert M.proj_dist(theta) == pytest.approx(float(explicit), rel=1e-12)
    assert M.chordal(theta) == pytest.approx(float(explicit) / math.sqrt(2 * 4), rel=1e-12)
    assert M.chordal_rand(1024, 4096) == pytest.approx(math.sqrt(0.75))


# ---------------------------------------------------------------------------- invariances, energy, identity


def test_singular_values_invariant_under_orthogonal_rotations():
    W = torch.randn(24, 16, generator=gen(1), dtype=F64)
    rotated = orthonormal(24, 24, 2) @ W @ orthonormal(16, 16, 3)
    np.testing.assert_allclose(torch.linalg.svdvals(rotated), torch.linalg.svdvals(W), rtol=1e-12)


def test_joint_sign_flips_of_singular_vectors_change_no_metric():
    Wa = torch.randn(24, 16, generator=gen(1), dtype=F64)
    Wb = Wa + 0.05 * torch.randn(24, 16, generator=gen(2), dtype=F64)
    fa, fb = factorize(Wa), factorize(Wb)
    s = torch.where(torch.rand(16, generator=gen(3)) < 0.5, -1.0, 1.0).to(F64)
    flipped = M.Factors(fa.S, fa.U_top * s, fa.V_top * s, fa.U_tail, fa.V_tail, fa.m, fa.n)
    for x, y in zip(M.weight_metrics(Wa, Wb, fa, fb, [2, 0.25, 16]), M.weight_metrics(Wa, Wb, flipped, fb, [2, 0.25, 16])):
        assert x.columns.keys() == y.columns.keys() and x.skip == y.skip
        for key, value in x.columns.items():
            assert value == (None if value is None else pytest.approx(y.columns[key], rel=1e-10, abs=1e-12)), key


def test_energy_split_sums_to_one_and_matches_the_iid_noise_baseline():
    m, n, k = 256, 128, 64
    basis = factorize(torch.randn(m, n, generator=gen(1), dtype=F64))  # independent of the noise
    Ua, _, Va = basis.top(k)
    stretch, rotation, outside = M.energy_split(torch.randn(m, n, generator=gen(2), dtype=F64), Ua, Va)
    assert abs(stretch + rotation + outside - 1) <= 1e-10
    assert (stretch + rotation) == pytest.approx(k * k / (m * n), rel=0.10)
    assert stretch == pytest.approx(k / (m * n), rel=0.5)  # only k terms: a loose check
    assert M.energy_split(torch.zeros(m, n, dtype=F64), Ua, Va) is None


def test_identity_comparison_gives_zero_angles_zero_drift_and_the_dw_skip():
    W = torch.randn(48, 32, generator=gen(1), dtype=F64)
    f = factorize(W)
    for res in M.weight_metrics(W, W, f, f, [0.0625, 0.25, 31, 32]):
        c = res.columns
        assert c["dw_fro"] == 0 and c["sdrift_mean_abs_rel_all"] == 0 and c["sdrift_max_abs_rel_topk"] == 0
        assert "dW == 0" in res.skip and "energy_stretch" not in c
        if res.k < 32:
            assert res.theta_u.max() < 1e-6 and res.theta_v.max() < 1e-6 and c["align_u"] == pytest.approx(1.0)
        else:
            assert res.skip_reason == "k >= min(m,n); dW == 0" and res.theta_u is None


def test_k_spec_resolution():
    assert M.resolve_k(0.0625, 896) == 56 and M.resolve_k(0.29, 100) == 29 and M.resolve_k(0.001, 64) == 1
    assert M.resolve_k(768, 512) == 768 and M.k_spec_str(0.25) == "0.25" and M.k_spec_str(768) == "768"


def test_delta_comparison_respects_the_numerical_rank():
    g = gen(1)
    D1 = torch.randn(32, 2, generator=g, dtype=F64) @ torch.randn(2, 24, generator=g, dtype=F64)  # rank 2
    D2 = -D1 + 1e-3 * torch.randn(32, 24, generator=g, dtype=F64)
    rows = {r.k: r for r in M.delta_metrics(D1, D2, factorize(D1), factorize(D2), [2, 3])}
    assert rows[2].skip == [] and rows[2].theta_u.max() < 1e-2
    assert rows[3].skip == ["k > numerical rank of dW"] and rows[3].theta_u is None
    assert rows[2].columns["delta_cosine"] == pytest.approx(-1, abs=1e-3) and rows[2].columns["ref_numerical_rank"] == 2


def test_planted_singular_value_changes_give_the_drift_columns_exactly():
    """§3.2: W_b = U diag(σ_a (1 + δ)) Vᵀ with known δ; the reference has 3 null singular values
    (rank 17 of 20), which the relative statistics skip though the target's are not null."""
    m, n, rank = 30, 20, 17
    U, V = orthonormal(m, n, 11), orthonormal(n, n, 12)
    sa = 10 * 0.85 ** torch.arange(n, dtype=F64)
    sa[rank:] = 0
    d = 0.07 * torch.sin(1.3 * torch.arange(rank, dtype=F64) + 0.4)  # both signs, |δ| <= 7 %: the order of σ is kept
    sb = torch.cat([sa[:rank] * (1 + d), torch.tensor([3e-3, 2e-3, 1e-3], dtype=F64)])
    Wa, Wb = (U * sa) @ V.T, (U * sb) @ V.T
    fa, fb = factorize(Wa), factorize(Wb)
    dn = d.numpy()
    for res in M.weight_metrics(Wa, Wb, fa, fb, [5, 0.5, 20]):
        c, top = res.columns, dn[: min(res.k, rank)]
        assert c["ref_numerical_rank"] == rank and c["tgt_numerical_rank"] == n
        want = {
            "sdrift_mean_abs_rel_topk": np.abs(top).mean(), "sdrift_median_abs_rel_topk": np.median(np.abs(top)),
            "sdrift_max_abs_rel_topk": np.abs(top).max(), "sdrift_mean_rel_topk": top.mean(), "sdrift_mean_abs_rel_all": np.abs(dn).mean(),
        }  # fmt: skip
        for col, value in want.items():
            assert c[col] == pytest.approx(value, rel=0, abs=1e-12), (res.k, col)


def test_planted_angles_between_weight_matrices_are_measured_to_1e_12():
    """§3.3 test (b) through the stage's path: W_b = G W_a, G rotating each top-k left singular
    vector u_i of W_a towards a direction outside W_a's column space by θ_i, so the top-k U
    angles are exactly Θ (1e-9 … π/2 − 1e-9) and the V angles and σ drift exactly 0."""
    m, n = 40, 24
    thetas = [1e-9, 1e-6, 1e-3, 0.1, 0.7, 0.9, 1.2, math.pi / 2 - 1e-6, math.pi / 2 - 1e-9]
    k = len(thetas)
    Q = orthonormal(m, m, 21)
    Ua, B = Q[:, :n], Q[:, n : n + k]  # m - n = 16 >= k directions outside the column space
    sigma = 10 * 0.8 ** torch.arange(n, dtype=F64)
    Wa = (Ua * sigma) @ orthonormal(n, n, 22).T
    A = Ua[:, :k]
    t = torch.tensor(thetas, dtype=F64)
    G = torch.eye(m, dtype=F64) + (A * (torch.cos(t) - 1)) @ A.T + (B * (torch.cos(t) - 1)) @ B.T + (B * torch.sin(t)) @ A.T - (A * torch.sin(t)) @ B.T
    Wb = G @ Wa
    [res] = M.weight_metrics(Wa, Wb, factorize(Wa), factorize(Wb), [k])
    err_u = np.abs(res.theta_u.numpy() - np.array(thetas)).max()
    assert err_u <= 1e-12, err_u
    assert res.theta_v.max() <= 1e-12 and res.columns["sdrift_max_abs_rel_topk"] <= 1e-12
    ref = np.sort(scipy.linalg.subspace_angles(factorize(Wa).U_top[:, :k].numpy(), factorize(Wb).U_top[:, :k].numpy()))
    np.testing.assert_allclose(res.theta_u.numpy(), ref, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------- B selection


def _summary(acc: dict[str, float], n: int = 100) -> pl.DataFrame:
    rows = [{"ckpt_id": c, "split": s, "n": n, "k": round(a * n), "accuracy": a, "ce": 1.0} for c, a in acc.items() for s in ("id", "ood")]
    return pl.DataFrame(rows)


CKPTS = pl.DataFrame(
    {"ckpt_id": ["base", "sft-10", "sft-20", "sft-40", "rl-s40-5", "rl-s40-9", "rl-s20-9"], "stage": ["base", "sft", "sft", "sft", "rl", "rl", "rl"],
     "step": [0, 10, 20, 40, 5, 9, 9], "parent": [None, "base", "base", "base", "sft-40", "sft-40", "sft-20"]}
)  # fmt: skip


def test_b_is_the_best_ood_checkpoint_ties_go_to_the_earliest_and_config_overrides():
    acc = {"base": 0.9, "sft-10": 0.30, "sft-20": 0.42, "sft-40": 0.42, "rl-s40-9": 0.99}
    b = select_b(_summary(acc), CKPTS)
    assert (b["ckpt_id"], b["selected_by"], b["selection_margin_hands"], b["selection_n_hands"]) == ("sft-20", "auto", 0, 100)
    b = select_b(_summary(acc | {"sft-20": 0.45}), CKPTS)
    assert (b["ckpt_id"], b["selection_accuracy"], b["selection_margin_hands"]) == ("sft-20", 0.45, 3)
    b = select_b(_summary(acc), CKPTS, b_step=10)
    assert (b["ckpt_id"], b["selected_by"], b["selection_margin_hands"]) == ("sft-10", "config", -12)
    with pytest.raises(ValueError, match="roles.b_step"):
        select_b(_summary(acc), CKPTS, b_step=30)


def test_roles_table_finds_r_from_the_configured_start_or_leaves_it_out():
    es = _summary({"sft-10": 0.3, "sft-20": 0.5, "sft-40": 0.4})
    roles = svd.select_roles(es, CKPTS, RolesSection(), run_id="t", model_name="m")
    assert dict(roles.select("role", "ckpt_id").rows()) == {"base": "base", "B": "sft-20", "S": "sft-40", "R": "rl-s40-9"}
    assert roles.schema == pl.Schema(ROLES_SCHEMA)
    r = roles.filter(pl.col("role") == "R").row(0, named=True)
    assert r["rl_start_step"] == 40 and r["step"] == 9 and r["selected_by"] == "auto"
    roles = svd.select_roles(es, CKPTS, RolesSection(rl_start=20))
    assert roles.filter(pl.col("role") == "R")["ckpt_id"].item() == "rl-s20-9"
    assert "R" not in svd.select_roles(es, CKPTS, RolesSection(rl_start=10))["role"].to_list()


# ---------------------------------------------------------------------------- engine and cache


def test_batched_svd_equals_unbatched():
    shapes = [(48, 32)] * 3 + [(16, 32)] * 2 + [(32, 48)]
    Ws = {f"w{i}": torch.randn(s, generator=gen(i), dtype=F64) for i, s in enumerate(shapes)}
    mats = [svd.Matrix(name, 0, "mlp", name, *W.shape) for name, W in Ws.items()]
    out = {}
    for batched in (False, True):
        svd.SVD_CALLS.clear()
        out[batched] = {mat.param: (U, S, Vh) for mat, U, S, Vh in decompose(mats, lambda m: Ws[m.param], "x", torch.device("cpu"), F64, batched, 1.0)}
        assert sum(svd.SVD_CALLS.values()) == len(mats)
    for name, (U, S, Vh) in out[False].items():
        U2, S2, Vh2 = out[True][name]
        torch.testing.assert_close(S2, S, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close((U2 * S2) @ Vh2, Ws[name], rtol=0, atol=1e-12)
        torch.testing.assert_close((U.T @ U2).abs().diagonal(), torch.ones(len(S), dtype=F64), rtol=0, atol=1e-10)
    # the memory cap splits a shape group into several batches
    assert len(list(svd.engine.batches(mats, F64, 48 * 32 * 8 * 4 / 2**30, True))) > 2


# ---------------------------------------------------------------------------- end to end on tiny checkpoints

TINY = {"name": "t", "model": {"builtin": "tiny", "tiny": {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2}}}
ROTATED = "model.layers.0.self_attn.q_proj.weight"
EPS = 1e-2  # planted rotation angle (rad)


def _save_like(base: Path, out: Path, tensors: dict) -> Path:
    shutil.copytree(base, out)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _perturbed(tensors: dict, seed: int, scale: float = 1e-2) -> dict:
    g = gen(seed)
    return {k: v + scale * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 else v for k, v in tensors.items()}


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """base -> sft-2 (one planted rotation) -> sft-4 -> sft-6, and rl-5 from sft-6; B = sft-4."""
    root = tmp_path_factory.mktemp("svd")
    cfg = parse_config(TINY | {"svd": {"k": [0.0625, 0.125, 0.25, 16]}})
    base = root / "base"
    model.build_tiny(base, cfg)
    w0 = load_file(base / "model.safetensors")
    W = w0[ROTATED].double()
    U = torch.linalg.svd(W).U
    u0, ul = U[:, :1], U[:, -1:]  # rotate u_0 towards u_31: one angle EPS for every k < 31
    G = torch.eye(32, dtype=F64) + (math.cos(EPS) - 1) * (u0 @ u0.T + ul @ ul.T) + math.sin(EPS) * (ul @ u0.T - u0 @ ul.T)
    w2 = w0 | {ROTATED: (G @ W).float()}
    w4, w6 = _perturbed(w2, 4), None
    w6 = _perturbed(w4, 6)
    dirs = {"base": base, "sft-2": _save_like(base, root / "sft-2", w2), "sft-4": _save_like(base, root / "sft-4", w4)}
    dirs |= {"sft-6": _save_like(base, root / "sft-6", w6), "rl-5": _save_like(base, root / "rl-5", _perturbed(w6, 5))}
    ckpts = pl.DataFrame(
        [{"ckpt_id": c, "stage": c.split("-")[0] if c != "base" else "base", "step": 0 if c == "base" else int(c.split("-")[1]),
          "parent": {"rl-5": "sft-6", "base": None}.get(c, "base"), "path": str(p), "content_hash": lm.weights_hash(p)} for c, p in dirs.items()],
        schema_overrides={"step": pl.Int32},
    )  # fmt: skip
    summary = _summary({"base": 0.05, "sft-2": 0.30, "sft-4": 0.50, "sft-6": 0.40, "rl-5": 0.6})
    return Store(root / "store"), cfg, ckpts, summary


def test_run_writes_every_table_with_its_schema_and_finds_the_planted_rotation(trajectory):
    store, cfg, ckpts, summary = trajectory
    svd.SVD_CALLS.clear()
    out = svd.run(store, cfg, ckpts, summary)
    n_mats = 2 * 7
    # 5 checkpoints, 2 deltas, 4 noise controls; each matrix of each decomposed exactly once
    assert len(svd.SVD_CALLS) == (5 + 2 + 4) * n_mats and set(svd.SVD_CALLS.values()) == {1}
    t = {name: pl.read_parquet(out / f"{name}.parquet") for name in svd.STAGE.tables}
    expected = {"checkpoint_roles": ROLES_SCHEMA, "svd_spectra": SPECTRA_SCHEMA, "svd_pair_metrics": PAIR_SCHEMA, "svd_principal_angles": ANGLES_SCHEMA,
                "svd_vs_accuracy": VS_ACCURACY_SCHEMA, "svd_correlations": CORRELATIONS_SCHEMA}  # fmt: skip
    for name, schema in expected.items():
        assert t[name].schema == pl.Schema(schema), name
        assert t[name]["run_id"].unique().to_list() == ["t"] and t[name]["model_name"].unique().to_list() == ["builtin:tiny"]
    assert dict(t["checkpoint_roles"].select("role", "ckpt_id").rows()) == {"base": "base", "B": "sft-4", "S": "sft-6", "R": "rl-5"}
    assert t["checkpoint_roles"]["storage_dtype"].unique().to_list() == ["F32"]

    pm = t["svd_pair_metrics"]
    assert set(pm["comparison"]) == {"weights", "noise_control", "deltas"}
    assert pm.filter(pl.col("comparison") == "deltas")[["ref_id", "tgt_id"]].unique().rows() == [("sft-4..sft-6", "sft-6..rl-5")]
    planted_pair = pm.filter(pl.col("ref_id") == "base", pl.col("tgt_id") == "sft-2", pl.col("k") < pl.col("rank"))
    hit = planted_pair.filter(pl.col("param") == ROTATED)
    assert hit.height == 4
    np.testing.assert_allclose(hit["angle_u_max_deg"], math.degrees(EPS), atol=1e-3)
    assert hit["angle_v_max_deg"].max() < 1e-3 and hit["sdrift_max_abs_rel_topk"].max() < 1e-5
    rest = planted_pair.filter(pl.col("param") != ROTATED)
    assert (rest["dw_fro"] == 0).all() and rest["skip_reason"].str.contains("dW == 0").all()
    assert rest["angle_u_max_deg"].max() < 1e-6 and rest["energy_stretch"].is_null().all()
    # k/v projections are 16 x 32: k = 16 is kept as a row with null angles
    kv16 = pm.filter(pl.col("module") == "k", pl.col("k") == 16, pl.col("comparison") == "weights")
    assert (kv16["skip_reason"].str.starts_with("k >= min(m,n)")).all() and kv16["angle_u_mean_deg"].is_null().all()
    assert kv16["n_forced_zero_u"].unique().to_list() == [16]
    with_dw = pm.filter(pl.col("comparison") != "deltas", pl.col("dw_fro") > 0, pl.col("k") <= pl.col("rank"))
    assert with_dw.height > 100 and with_dw["energy_stretch"].is_not_null().all()
    sums = with_dw.select(pl.col("energy_stretch") + pl.col("energy_rotation") + pl.col("energy_outside"))
    np.testing.assert_allclose(sums.to_series(), 1.0, atol=1e-10)
    assert with_dw.filter(pl.col("k") > 1)["energy_rotation"].min() > 0 and with_dw.filter(pl.col("k") < pl.col("rank"))["energy_outside"].min() > 0

    angles = t["svd_principal_angles"].filter(pl.col("ref_id") == "base", pl.col("tgt_id") == "sft-2", pl.col("param") == ROTATED, pl.col("side") == "U")
    assert angles.group_by("k").agg(pl.col("theta_rad").max())["theta_rad"].to_list() == pytest.approx([EPS] * 4, abs=1e-5)
    spectra = t["svd_spectra"]
    assert spectra.filter(pl.col("object_id") == "base", pl.col("param") == ROTATED).height == 32
    assert set(spectra.filter(pl.col("object_kind") == "delta")["object_id"]) == {"sft-4..sft-6", "sft-6..rl-5"}

    vs = t["svd_vs_accuracy"]
    base_traj = vs.filter(pl.col("reference") == "base", pl.col("k_spec") == "0.25").sort("tgt_step")
    assert base_traj["tgt_id"].to_list() == ["sft-2", "sft-4", "sft-6"] and base_traj["accuracy_ood"].to_list() == [0.30, 0.50, 0.40]
    assert vs.filter(pl.col("reference") == "B")["tgt_id"].unique().to_list() == ["sft-6"]
    corr = t["svd_correlations"].filter(pl.col("reference") == "base", pl.col("metric") == "dw_rel_fro", pl.col("k_spec") == "0.25")
    assert corr["n_checkpoints"].to_list() == [3, 3] and corr["spearman_rho"].is_not_null().all()


def direct_metrics(Wa: np.ndarray, Wb: np.ndarray, k: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """The §3.2-§3.6 columns of one pair, written out with numpy and scipy alone (no code of
    the stage), and the sorted U / V angles from scipy.linalg.subspace_angles."""
    Ua, sa, Vha = np.linalg.svd(Wa, full_matrices=False)
    Ub, sb, Vhb = np.linalg.svd(Wb, full_matrices=False)
    Va, Vb = Vha.T, Vhb.T
    dW = Wb - Wa
    live = sa > max(Wa.shape) * np.finfo(np.float64).eps * sa[0]
    delta = (sb[live] - sa[live]) / sa[live]
    top = delta[:k]
    tu = np.sort(scipy.linalg.subspace_angles(Ua[:, :k], Ub[:, :k]))
    tv = np.sort(scipy.linalg.subspace_angles(Va[:, :k], Vb[:, :k]))
    E = np.sum(dW**2)
    C = Ua[:, :k].T @ dW @ Va[:, :k]
    outside = dW - Ua[:, :k] @ C @ Va[:, :k].T
    cols = {
        "dw_fro": np.linalg.norm(dW), "dw_rel_fro": np.linalg.norm(dW) / np.linalg.norm(Wa),
        "sdrift_mean_abs_rel_topk": np.abs(top).mean(), "sdrift_median_abs_rel_topk": np.median(np.abs(top)),
        "sdrift_max_abs_rel_topk": np.abs(top).max(), "sdrift_mean_rel_topk": top.mean(), "sdrift_mean_abs_rel_all": np.abs(delta).mean(),
        "angle_u_mean_deg": np.degrees(tu).mean(), "angle_u_max_deg": np.degrees(tu).max(), "angle_v_mean_deg": np.degrees(tv).mean(),
        "chordal_u": np.sqrt(np.sum(np.sin(tu) ** 2) / k), "proj_dist_v": np.linalg.norm(Va[:, :k] @ Va[:, :k].T - Vb[:, :k] @ Vb[:, :k].T),
        "energy_stretch": np.sum(np.diag(C) ** 2) / E, "energy_rotation": (np.sum(C**2) - np.sum(np.diag(C) ** 2)) / E,
        "energy_outside": np.sum(outside**2) / E,
        "align_u": np.abs(Ua[:, :k].T @ Ub[:, :k]).max(axis=1).mean(), "align_v": np.abs(Va[:, :k].T @ Vb[:, :k]).max(axis=1).mean(),
        "sigma_gap_rel_at_k": (sa[k - 1] - sa[k]) / sa[k - 1], "ref_numerical_rank": int(live.sum()),
    }  # fmt: skip
    return cols, tu, tv


@pytest.mark.parametrize("pair", [("sft-4", "sft-6"), ("base", "sft-4")])
def test_pair_metrics_and_angles_equal_numpy_and_scipy_on_the_checkpoints(trajectory, pair):
    """Every value the run stores for a random-perturbation pair (B -> S, base -> B): each metric
    column against numpy, the angles table against scipy.linalg.subspace_angles (§3.3 test (a),
    atol 1e-7 rad), the spectra against numpy's singular values."""
    store, cfg, ckpts, summary = trajectory
    out = svd.run(store, cfg, ckpts, summary)
    pm = pl.read_parquet(out / "svd_pair_metrics.parquet").filter(pl.col("comparison") == "weights", pl.col("ref_id") == pair[0], pl.col("tgt_id") == pair[1])
    angles = pl.read_parquet(out / "svd_principal_angles.parquet").filter(pl.col("comparison") == "weights", pl.col("ref_id") == pair[0], pl.col("tgt_id") == pair[1])
    spectra = pl.read_parquet(out / "svd_spectra.parquet")
    paths = dict(zip(ckpts["ckpt_id"], ckpts["path"]))
    weights = {c: load_file(Path(paths[c]) / "model.safetensors") for c in pair}
    rows = pm.filter(pl.col("k") < pl.col("rank"))
    assert rows.height == 10 * 4 + 4 * 3  # 10 matrices with r = 32 at k = 2, 4, 8, 16; 4 (k, v) with r = 16 at k = 1, 2, 4
    checked = 0
    for row in rows.iter_rows(named=True):
        Wa, Wb = (weights[c][row["param"]].double().numpy() for c in pair)
        want, tu, tv = direct_metrics(Wa, Wb, row["k"])
        for col, value in want.items():
            assert row[col] is not None, (col, row["param"], row["k"])
            assert row[col] == pytest.approx(value, rel=1e-9, abs=1e-9 if "deg" not in col else 1e-6), (col, row["param"], row["k"])
        for side, ref in (("U", tu), ("V", tv)):
            got = angles.filter(pl.col("param") == row["param"], pl.col("k") == row["k"], pl.col("side") == side).sort("angle_index")["theta_rad"]
            np.testing.assert_allclose(got.to_numpy(), ref, rtol=0, atol=1e-7)
        checked += 1
    assert checked == rows.height
    assert min(rows["angle_u_max_deg"]) > 0.01  # a real rotation, not zeros compared with zeros
    for c in pair:
        for param, W in weights[c].items():
            if W.ndim == 2 and "layers" in param:
                got = spectra.filter(pl.col("object_id") == c, pl.col("param") == param).sort("sv_index")["sigma"].to_numpy()
                np.testing.assert_allclose(got, np.linalg.svd(W.double().numpy(), compute_uv=False), rtol=1e-12, atol=1e-12)


def test_second_analysis_computes_no_svd_and_eval_changes_change_the_key(trajectory):
    store, cfg, ckpts, summary = trajectory
    first = svd.run(store, cfg, ckpts, summary)
    svd.SVD_CALLS.clear()
    assert svd.run(store, cfg, ckpts, summary) == first
    # a new analysis (another k-grid within the cached columns) reuses every cached SVD
    fewer = parse_config(TINY | {"svd": {"k": [0.125]}})
    assert svd.run(store, fewer, ckpts, summary) != first
    assert sum(svd.SVD_CALLS.values()) == 0
    # eval results that move B give a new run
    moved = summary.with_columns(accuracy=pl.when(pl.col("ckpt_id") == "sft-2").then(0.9).otherwise(pl.col("accuracy")))
    assert svd.artifact(store, cfg, ckpts, moved) != svd.artifact(store, cfg, ckpts, summary)
    # the edit stage's access: cached factors, more columns on request (a wider artifact)
    row = ckpts.filter(pl.col("ckpt_id") == "sft-4").row(0, named=True)
    f = svd.load_svd(store, cfg, row, ROTATED)
    assert sum(svd.SVD_CALLS.values()) == 0 and f.n_top == 16 and f.S.dtype == F64
    with pytest.raises(ValueError, match="request more columns"):
        f.tail(2)
    g = svd.load_svd(store, cfg, row, ROTATED, svd.ColumnRequest(top=(0.25,), tail=(3,)))
    assert svd.SVD_CALLS[("sft-4", ROTATED)] == 1 and g.tail(3)[0].shape == (32, 3)
    svd.SVD_CALLS.clear()
    svd.load_svd(store, cfg, row, ROTATED, svd.ColumnRequest(tail=(2,)))
    assert sum(svd.SVD_CALLS.values()) == 0


def test_matrix_selection_rules(trajectory):
    _, cfg, ckpts, _ = trajectory
    path = ckpts["path"][0]
    mats = svd.select_matrices(path, cfg.svd)
    assert len(mats) == 14 and mats[0].param == "model.layers.0.self_attn.q_proj.weight"
    k = next(m for m in mats if m.module == "k")
    assert (k.layer, k.block, k.m, k.n, k.r) == (0, "self_attn", 16, 32, 16)
    no_mlp = svd.select_matrices(path, parse_config(TINY | {"svd": {"exclude": [r".*\.mlp\..*"]}}).svd)
    assert {m.block for m in no_mlp} == {"self_attn"} and len(no_mlp) == 8
    tied = svd.select_matrices(path, parse_config(TINY | {"svd": {"include_embeddings": True, "include_lm_head": True}}).svd)
    assert [m.param for m in tied if m.layer == -1] == ["model.embed_tokens.weight"]
    with pytest.raises(ConfigError, match=r"svd.include\[0\]: .*matches no tensor"):
        svd.select_matrices(path, parse_config(TINY | {"svd": {"include": [r"nothing\.here"]}}).svd)
    with pytest.raises(ConfigError, match=r"svd.include: .*not 2-D.*norm"):
        svd.select_matrices(path, parse_config(TINY | {"svd": {"include": [r"model\.layers\.0\..*"]}}).svd)


def test_fp32_batched_analysis_matches_fp64(trajectory):
    """The GPU settings (fp32, equal-shape batches) run on the CPU agree with the fp64 tables."""
    store, cfg, ckpts, summary = trajectory
    t64 = svd.analyse(store, cfg, ckpts, summary)["svd_pair_metrics"]
    t32 = svd.analyse(store, cfg, ckpts, summary, dtype=torch.float32, batched=True)["svd_pair_metrics"]
    assert t32["compute_dtype"].unique().to_list() == ["float32"] and t32.height == t64.height
    keys = ["comparison", "ref_id", "tgt_id", "param", "k"]
    both = t64.join(t32, on=keys, suffix="_32")
    assert both.height == t64.height
    assert (both["skip_reason"].fill_null("") == both["skip_reason_32"].fill_null("")).all()
    # Rows where each column must hold a value: weight and noise comparisons (all of them for
    # the norms; with dW != 0 and k <= r for the energy split; k < r for angles), deltas too
    # for alignment (k within both numerical ranks).
    skip = pl.col("skip_reason").fill_null("")
    on_weights = pl.col("comparison") != "deltas"
    expected = {
        "dw_fro": on_weights, "sdrift_mean_abs_rel_all": on_weights, "sdrift_mean_abs_rel_topk": on_weights & ~skip.str.contains("k > min"),
        "energy_rotation": on_weights & ~skip.str.contains("dW == 0") & ~skip.str.contains("k > min"),
        "chordal_u": ~skip.str.contains("k >= min") & ~skip.str.contains("numerical rank"),
        "align_v": ~skip.str.contains("k > min") & ~skip.str.contains("numerical rank"),
    }  # fmt: skip
    for col, atol in [("dw_fro", 1e-6), ("energy_rotation", 1e-4), ("chordal_u", 1e-3), ("align_v", 1e-4), ("sdrift_mean_abs_rel_topk", 1e-4), ("sdrift_mean_abs_rel_all", 5e-3)]:
        want = both.select(expected[col]).to_series()
        assert want.sum() >= 40, col  # most rows: the check below is over real values
        for c in (col, f"{col}_32"):
            assert (both[c].is_not_null() == want).all(), f"{c}: null where a value is due, or a value where the rule says null"
        diff = both.select((pl.col(col) - pl.col(f"{col}_32")).abs().max()).item()
        assert diff < atol, (col, diff)


def test_prefect_task_reads_parquet_inputs_and_honours_fault_injection(trajectory, tmp_path, monkeypatch):
    from rlheal.faults import InjectedFault

    store, cfg, ckpts, summary = trajectory
    ckpts.write_parquet(tmp_path / "checkpoints.parquet")
    summary.write_parquet(tmp_path / "eval_summary.parquet")
    art = svd.artifact(store, cfg, ckpts, summary)
    kwargs = dict(artifact=art, cfg=cfg, checkpoints=[str(tmp_path / "checkpoints.parquet")], eval_summary=str(tmp_path / "eval_summary.parquet"))
    assert svd.stage.fn(**kwargs) == str(art.path) == str(svd.run(store, cfg, ckpts, summary))
    monkeypatch.setenv("RLHEAL_FAULT", "svd")
    with pytest.raises(InjectedFault):
        svd.stage.fn(**kwargs)


# ---------------------------------------------------------------------------- which columns each object stores

# The editing grid of the next two tests: a full-rank edit B -> S, a partial one S -> R with a
# tail, and a copy (which reads no SVD) from base.
EDIT_GRID = [
    {"method": "swap_directions", "k_top": 1.0},
    {"method": "swap_triplets", "k_top": 0.5, "k_tail": 0.125, "donor": "S", "target": "R"},
    {"method": "copy", "donor": "base", "target": "S"},
]


def _run_stage(store: Store, cfg, ckpts: pl.DataFrame, summary: pl.DataFrame, tmp_path: Path) -> Path:
    """The Prefect task body, as the flow calls it (with the editing sweep's columns)."""
    from tasks import edit

    ckpts.write_parquet(tmp_path / "checkpoints.parquet")
    summary.write_parquet(tmp_path / "eval_summary.parquet")
    art = svd.artifact(store, cfg, ckpts, summary)
    out = svd.stage.fn(artifact=art, cfg=cfg, checkpoints=[str(tmp_path / "checkpoints.parquet")], eval_summary=str(tmp_path / "eval_summary.parquet"),
                       edit_columns=edit.column_requests(cfg))
    return Path(out)


def stored_columns(store: Store) -> dict[str, dict[str, tuple[int, int]]]:
    """label -> param -> (U columns, V columns) as the cache's safetensors files hold them
    (top + tail), read from the file headers, not from the manifest's own account."""
    from safetensors import safe_open

    out: dict[str, dict[str, tuple[int, int]]] = {}
    for manifest in (store.root / "svd").glob("*/manifest.json"):
        m = store.manifest(manifest.parent)
        if "columns" not in m:
            continue  # the analysis run itself
        assert m["label"] not in out, f"{m['label']} has two cache artifacts"
        cols = {}
        for f in manifest.parent.glob("*.safetensors"):
            with safe_open(f, framework="pt") as sf:
                shape = {k: sf.get_slice(k).get_shape() for k in sf.keys()}
            u = shape["U_top"][1] + shape.get("U_tail", [0, 0])[1]
            v = shape["V_top"][1] + shape.get("V_tail", [0, 0])[1]
            cols[f.name.removesuffix(".safetensors")] = (u, v)
        out[m["label"]] = cols
    return out


def test_only_the_checkpoints_editing_reads_store_its_columns(trajectory, tmp_path):
    """Issue 14 §4: a full-rank edit asks for every column of its donor and target (B, S), not
    of every trajectory checkpoint, delta and noise control; R stores what its edit needs."""
    _, _, ckpts, summary = trajectory
    cfg = parse_config(TINY | {"svd": {"k": [0.25]}, "edit": {"grid": "none", "variants": EDIT_GRID}})
    store = Store(tmp_path / "store")
    svd.SVD_CALLS.clear()
    _run_stage(store, cfg, ckpts, summary, tmp_path)
    assert len(svd.SVD_CALLS) == (5 + 2 + 4) * 14 and set(svd.SVD_CALLS.values()) == {1}
    got = stored_columns(store)
    measured = {"base", "sft-2", "sft-4..sft-6", "sft-6..rl-5"} | {f"noise:{a}..{b}" for a, b in [("base", "sft-4"), ("sft-4", "sft-6"), ("sft-6", "rl-5"), ("sft-4", "rl-5")]}
    assert set(got) == measured | {"sft-4", "sft-6", "rl-5"}  # B, S, R
    mats = svd.select_matrices(ckpts["path"][0], cfg.svd)
    assert {m.r for m in mats} == {16, 32}
    for mat in mats:
        r = mat.r
        q = r // 4  # svd.k 0.25
        for label in measured:  # the measurement grid only: 8 of 32 or 4 of 16 columns
            assert got[label][mat.param] == (q, q), (label, mat.param)
        assert got["sft-4"][mat.param] == got["sft-6"][mat.param] == (r, r)  # B -> S at k_top 1.0
        assert got["rl-5"][mat.param] == (r // 2 + r // 8,) * 2  # top 0.5 and tail 0.125 of S -> R
    # the same, as the plan a store-space estimate reads
    from tasks import edit

    plan = svd.columns_plan(cfg, [(32, 32), (16, 32)], edit_columns=edit.column_requests(cfg))
    assert plan == {"checkpoint": [(8, 0), (4, 0)], "delta": [(8, 0), (4, 0)], "noise": [(8, 0), (4, 0)],
                    "edit:B": [(32, 0), (16, 0)], "edit:S": [(32, 0), (16, 0)], "edit:R": [(16, 4), (8, 2)]}  # fmt: skip


def test_a_compat_study_decomposes_each_checkpoint_matrix_once_across_svd_and_edit(trajectory, tmp_path):
    """Issue 14 §5: under reference_compat the edits also touch the embedding (quirk 3). The svd
    stage decomposes it with B's and S's other matrices, and editing decomposes nothing."""
    from tasks import edit

    _, _, ckpts, summary = trajectory
    grid = [{"method": "swap_directions", "k_top": 8}, {"method": "swap_triplets", "k_top": 4, "k_tail": 2},
            {"method": "sv_only", "k_top": 64}, {"method": "copy", "k_top": 4096, "layers": "0-0"}, {"method": "swap_directions", "k_top": 8, "layers": "1-1"}]  # fmt: skip
    cfg = parse_config(TINY | {"svd": {"k": [0.25]}, "edit": {"grid": "none", "reference_compat": True, "variants": grid}})
    store = Store(tmp_path / "store")
    svd.SVD_CALLS.clear()
    out = _run_stage(store, cfg, ckpts, summary, tmp_path)
    after_svd = dict(svd.SVD_CALLS)
    roles = pl.read_parquet(out / "checkpoint_roles.parquet")
    rows = {r["ckpt_id"]: r for r in ckpts.to_dicts()}
    variants = [v for v in edit.variants(cfg, roles, 2) if v["method"] != "none"]
    assert len(variants) == 5 and all(v["reference_compat"] for v in variants)
    edited = set()
    for v in variants:
        with edit.resident(rows[v["target_id"]], torch.float16) as loaded:
            with edit.applied(store, cfg, v, loaded, rows[v["target_id"]], rows[v["donor_id"]]) as log:
                edited |= {r["param"] for r in log if r["n_indices"] and not r["compat_early_exit"]}
    assert "model.embed_tokens.weight" in edited  # the edits did read factors of the embedding
    assert dict(svd.SVD_CALLS) == after_svd  # ... all from the svd stage's cache
    assert set(svd.SVD_CALLS.values()) == {1}
    assert len(svd.SVD_CALLS) == (5 + 2 + 4) * 14 + 2
    assert {c for c, p in svd.SVD_CALLS if p == "model.embed_tokens.weight"} == {"sft-4", "sft-6"}


def test_the_flow_decomposes_each_checkpoint_once_b_is_known_and_the_analysis_only_reads_them(trajectory, tmp_path):
    """Issue 18: the flow has each checkpoint the analysis reads decomposed while the study
    runs, with the very columns the analysis will ask of it (B's and S's editing columns
    included), so the analysis decomposes only deltas and noise controls: still one SVD per
    (checkpoint, matrix) (§4.5 rule 1). Nothing is handed out before B can be chosen (every
    SFT checkpoint's OOD accuracy), R once its run has ended, and each checkpoint once."""
    from tasks import edit

    _, _, ckpts, summary = trajectory
    cfg = parse_config(TINY | {"svd": {"k": [0.25]}, "sft": {"save_steps": [0, 2, 4, 6]}, "rl": {"from_steps": [6]}, "edit": {"grid": "none", "variants": EDIT_GRID}})
    store = Store(tmp_path / "store")
    rows = {r["ckpt_id"]: r for r in ckpts.to_dicts()}
    evals = {}
    for (c, split), part in summary.group_by("ckpt_id", "split"):
        (tmp_path / "evals" / f"{c}-{split}").mkdir(parents=True)
        part.write_parquet(tmp_path / "evals" / f"{c}-{split}" / "eval_summary.parquet")
        evals[c, split] = str(tmp_path / "evals" / f"{c}-{split}")
    d = svd.Decompositions(store, cfg, edit.column_requests(cfg))
    for c in ("base", "sft-2", "sft-4", "sft-6"):
        d.seen(rows[c])
    for c in ("base", "sft-2", "sft-4"):
        d.evaluated(evals[c, "id"])
        d.evaluated(evals[c, "ood"])
    d.evaluated(evals["sft-6", "id"])
    assert d.new() == []  # sft-6's OOD accuracy could still make it B
    d.evaluated(evals["sft-6", "ood"])
    first = d.new()
    assert sorted(label for label, *_ in first) == ["svd base", "svd sft step=2", "svd sft step=4", "svd sft step=6"]
    d.seen(rows["rl-5"] | {"rl_start_step": 6})
    second = d.new()
    assert [label for label, *_ in second] == ["svd rl from=6 upd=5"] and d.new() == []
    svd.SVD_CALLS.clear()
    for label, row, columns, art in first + second:
        assert not store.is_sealed(art)
        assert svd.decompose_stage.fn(artifact=art, cfg=cfg, ckpt=row, columns=columns, name=label) == str(art.path)
    assert {c for c, _ in svd.SVD_CALLS} == {"base", "sft-2", "sft-4", "sft-6", "rl-5"} and len(svd.SVD_CALLS) == 5 * 14
    _run_stage(store, cfg, ckpts, summary, tmp_path)
    assert set(svd.SVD_CALLS.values()) == {1} and len(svd.SVD_CALLS) == (5 + 2 + 4) * 14
    # a second look (a resumed run) finds every one sealed: the flow submits none of them
    again = svd.Decompositions(store, cfg, edit.column_requests(cfg))
    for c in rows:
        again.seen(rows[c] | ({"rl_start_step": 6} if c == "rl-5" else {}))
    for path in evals.values():
        again.evaluated(path)
    assert all(store.is_sealed(art) for *_, art in again.new())
