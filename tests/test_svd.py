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
from tasks import models, svd
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
    models.build_tiny(base, cfg.model)
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
          "parent": {"rl-5": "sft-6", "base": None}.get(c, "base"), "path": str(p), "content_hash": models.weights_hash(p)} for c, p in dirs.items()],
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
    t = {name: pl.read_parquet(out / f"{name}.parquet") for name in svd.TABLES}
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
    sums = pm.filter(pl.col("energy_stretch").is_not_null()).select(pl.col("energy_stretch") + pl.col("energy_rotation") + pl.col("energy_outside"))
    np.testing.assert_allclose(sums.to_series(), 1.0, atol=1e-10)

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
    assert svd.artifact(store, cfg, svd.artifact_inputs(cfg, ckpts, moved)) != svd.artifact(store, cfg, svd.artifact_inputs(cfg, ckpts, summary))
    # the editing stage's access: cached factors, more columns on request (a wider artifact)
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
    for col, atol in [("dw_fro", 1e-6), ("energy_rotation", 1e-4), ("chordal_u", 1e-3), ("align_v", 1e-4), ("sdrift_mean_abs_rel_topk", 1e-4), ("sdrift_mean_abs_rel_all", 5e-3)]:
        diff = both.select((pl.col(col) - pl.col(f"{col}_32")).abs().max()).item()
        assert diff is None or diff < atol, (col, diff)
    assert (both["skip_reason"].fill_null("") == both["skip_reason_32"].fill_null("")).all()


def test_prefect_task_reads_parquet_inputs_and_honours_fault_injection(trajectory, tmp_path, monkeypatch):
    from rlheal.faults import InjectedFault

    store, cfg, ckpts, summary = trajectory
    ckpts.write_parquet(tmp_path / "checkpoints.parquet")
    summary.write_parquet(tmp_path / "eval_summary.parquet")
    art = svd.artifact(store, cfg, svd.artifact_inputs(cfg, ckpts, summary))
    kwargs = dict(artifact=str(art), cfg=cfg, checkpoints=[str(tmp_path / "checkpoints.parquet")], eval_summary=str(tmp_path / "eval_summary.parquet"))
    assert svd.stage.fn(**kwargs) == str(art.path) == str(svd.run(store, cfg, ckpts, summary))
    monkeypatch.setenv("RLHEAL_FAULT", "svd")
    with pytest.raises(InjectedFault):
        svd.stage.fn(**kwargs)
