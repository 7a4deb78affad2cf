"""tasks/drift/signals.py: the drift stage's label-free signals (issue 19, analysis.md §5),
against values computed by hand or by a second, slower formula."""

import copy
import math

import pytest
import torch

from tasks.drift import signals as sg


def logsoftmax(x):
    return torch.log_softmax(torch.as_tensor(x, dtype=torch.float64), dim=-1)


def test_kl_js_entropy_match_their_definitions_on_small_distributions():
    p, q = torch.tensor([[0.5, 0.25, 0.25, 0.0]]), torch.tensor([[0.25, 0.25, 0.25, 0.25]])
    logp, logq = p.double().log(), q.double().log()
    # KL(p‖q) = Σ p log(p/q), 0·log 0 = 0: 0.5 ln 2
    assert sg.kl(logp, logq).item() == pytest.approx(0.5 * math.log(2))
    assert sg.kl(logp, logp).item() == 0.0
    assert math.isinf(sg.kl(logq, logp).item())  # q puts mass where p has none
    m = (p + q) / 2
    by_hand = 0.5 * sum(a * math.log(a / c) for a, c in zip(p[0].tolist(), m[0].tolist()) if a > 0)
    by_hand += 0.5 * sum(b * math.log(b / c) for b, c in zip(q[0].tolist(), m[0].tolist()) if b > 0)
    assert sg.js(logp, logq).item() == pytest.approx(by_hand)
    assert sg.js(logp, logq).item() == pytest.approx(sg.js(logq, logp).item())  # symmetric
    disjoint = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).log()
    assert sg.js(disjoint[:1], disjoint[1:]).item() == pytest.approx(math.log(2))  # its maximum
    assert sg.entropy(logq).item() == pytest.approx(math.log(4))
    assert sg.entropy(logp).item() == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))


def test_margin_and_topk_jaccard():
    logits = torch.tensor([[3.0, 1.0, 2.5, -1.0], [0.0, 0.0, 0.0, 5.0]], dtype=torch.float64)
    assert sg.margin(logsoftmax(logits)).tolist() == pytest.approx([0.5, 5.0])  # as on the logits
    a = logsoftmax([[4.0, 3.0, 2.0, 1.0]])
    b = logsoftmax([[4.0, 1.0, 3.0, 2.0]])
    assert sg.topk_jaccard(a, b, 1).item() == 1.0  # both top-1: token 0
    assert sg.topk_jaccard(a, b, 2).item() == pytest.approx(1 / 3)  # {0,1} vs {0,2}
    assert sg.topk_jaccard(a, b, 4).item() == 1.0


def test_sequence_kl_sums_the_token_kls_over_the_scored_positions_only():
    base = logsoftmax(torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)))
    other = logsoftmax(torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1)))
    scored = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    token = sg.kl(base, other)
    assert sg.sequence_kl(base, other, scored).tolist() == pytest.approx([float(token[0, 0] + token[0, 1]), float(token[1, 1] + token[1, 2])])
    assert sg.sequence_kl(base, base, scored).tolist() == [0.0, 0.0]


def test_lm_head_check_accepts_the_states_lm_head_reads_and_refuses_normed_again():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    h = torch.randn(4, 8) * 3
    sg.check_lm_head(h, head(h), head, "tiny")
    normed_again = torch.nn.functional.rms_norm(h, (8,))
    with pytest.raises(ValueError, match="tiny: lm_head"):
        sg.check_lm_head(normed_again, head(h), head, "tiny")


def test_cosine_and_its_quantiles():
    hx = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    hy = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert sg.cosine(hx, hy).tolist() == pytest.approx([1.0, 0.0, -1.0])
    q = sg.quantiles(torch.arange(11, dtype=torch.float64))
    assert q == {"mean": 5.0, "p10": 1.0, "p50": 5.0, "p90": 9.0}


def feature_cka(x, y):
    """The feature form, always (the reference for the Gram form)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return float((x.T @ y).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def test_linear_cka_is_one_on_itself_invariant_to_rotation_and_scale_and_its_gram_form_agrees():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert sg.linear_cka(x, x) == pytest.approx(1.0)
    assert sg.linear_cka(x, 3.0 * x @ rot + 5.0) == pytest.approx(1.0)  # rotation, scale, shift
    y = torch.randn(20, 6, generator=g, dtype=torch.float64)
    assert 0 < sg.linear_cka(x, y) < 0.9
    assert sg.linear_cka(x, y) == pytest.approx(feature_cka(x, y))  # N >= d: feature form
    wide_x, wide_y = torch.randn(5, 40, generator=g, dtype=torch.float64), torch.randn(5, 40, generator=g, dtype=torch.float64)
    assert sg.linear_cka(wide_x, wide_y) == pytest.approx(feature_cka(wide_x, wide_y))  # N < d: Gram form, same value


def mmd2_by_loops(x, y):
    """§5's estimator written out element by element."""
    pooled = torch.cat([x, y])
    d2 = [((a - b) ** 2).sum().item() for i, a in enumerate(pooled) for j, b in enumerate(pooled) if i < j]
    positive = sorted(v for v in d2 if v > 0)
    half = len(positive) // 2
    median = positive[half] if len(positive) % 2 else (positive[half - 1] + positive[half]) / 2
    gamma = 1 / median

    def k(a, b):
        return math.exp(-gamma * ((a - b) ** 2).sum().item())

    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_rbf_mmd2_is_the_unbiased_estimator_with_the_median_bandwidth():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = torch.randn(7, 3, generator=g, dtype=torch.float64) + 1.5
    assert sg.rbf_mmd2(x, y) == pytest.approx(mmd2_by_loops(x, y), rel=1e-9)
    assert sg.rbf_mmd2(x, y) > 0.1
    same = torch.randn(9, 3, generator=g, dtype=torch.float64)
    assert abs(sg.rbf_mmd2(x, same)) < sg.rbf_mmd2(x, y) / 3  # one distribution: near 0, may be < 0
    assert sg.rbf_mmd2(x, x.clone()) < 0  # unbiased: the same sample scores below zero


def test_mmd_bandwidth_skips_zero_distances_and_large_samples_are_subsampled():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 2, generator=g, dtype=torch.float64)
    x = torch.cat([x, x[:3]])  # tied rows: zero distances the median must not count
    y = torch.randn(5, 2, generator=g, dtype=torch.float64) + 1.0
    assert sg.rbf_mmd2(x, y) == pytest.approx(mmd2_by_loops(x, y), rel=1e-9)
    big_x = torch.randn(600, 2, generator=g, dtype=torch.float64)
    big_y = torch.randn(700, 2, generator=g, dtype=torch.float64) + 0.5
    assert sg.rbf_mmd2(big_x, big_y) == pytest.approx(sg.rbf_mmd2(sg.subsample(big_x), sg.subsample(big_y)), rel=1e-12)
    assert sg.rbf_mmd2(big_x, big_y) != pytest.approx(sg.rbf_mmd2(big_x[:512], big_y[:512]), rel=1e-6)  # seeded rows, not the first


def test_mmd_subsamples_at_most_512_rows_with_a_fixed_seed():
    g = torch.Generator().manual_seed(0)
    big = torch.randn(700, 2, generator=g, dtype=torch.float64)
    a, b = sg.subsample(big), sg.subsample(big)
    assert a.shape == (512, 2) and torch.equal(a, b)  # seeded: the same rows every time
    assert not torch.equal(sg.subsample(big, seed=1), a)
    assert torch.equal(sg.subsample(big[:100]), big[:100])  # small samples whole


def test_recovery_and_win_rate_have_the_direction_of_closer_to_b():
    # similarity: R closer to B has the higher cosine
    assert sg.recovery("cosine_mean", bs=0.6, br=0.9) == pytest.approx((0.3, 0.5))
    # distance: R closer to B has the lower divergence
    assert sg.recovery("js", bs=0.2, br=0.05) == pytest.approx((0.15, 0.75))
    assert sg.recovery("js", bs=0.05, br=0.2)[0] < 0
    assert sg.win_rate("cosine", bs=[0.5, 0.5, 0.9, 0.1], br=[0.6, 0.5, 0.8, 0.2]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert sg.win_rate("js", bs=[0.5, 0.5, 0.9], br=[0.6, 0.5, 0.8]) == pytest.approx((0 + 0.5 + 1) / 3)


# ---------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The builtin tiny model, a copy of it nudged a little (a moved checkpoint), and
    prompt + answer sequences of ID hands as the chat template renders them."""
    import polars as pl

    from rlheal.config import parse_config
    from rlheal.store import Store
    from tasks import data, lm
    from tasks.chat import prompt_completion_ids
    from tasks.model import build_tiny

    root = tmp_path_factory.mktemp("drift")
    cfg = parse_config({"name": "t", "data": {"train_size": 64, "eval_size": 7}, "sft": {"save_steps": [0, 1], "batch_size": 64, "per_device_batch_size": 64}})
    data_dir = data.run(Store(root / "store"), cfg)
    build_tiny(root / "base", cfg)
    tok, base = lm.load_tokenizer(root / "base"), lm.load_model(root / "base").eval()
    moved = lm.load_model(root / "base").eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in moved.parameters():
            p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    table = pl.read_parquet(f"{data_dir}/eval_set_id.parquet")
    seqs = [prompt_completion_ids(tok, [{"role": "user", "content": p}], [{"role": "assistant", "content": a}], cfg.chat.date_string) for p, a in zip(table["prompt"], table["answer"])]
    return tok, base, moved, [s for s, _ in seqs], [n for _, n in seqs]


def test_batching_and_padding_leave_each_prompts_states_as_alone(tiny):
    from tasks.drift import states

    tok, base, _, seqs, n = tiny
    assert len(set(map(len, seqs))) > 1  # the batch pads
    together = list(states.forward(base, seqs, n, tok.pad_token_id, batch_size=4))
    alone = [next(states.forward(base, [s], [k], tok.pad_token_id)) for s, k in zip(seqs, n)]
    hidden = torch.cat([b.hidden for b in together])
    anchor = torch.cat([b.anchor for b in together])
    for i, one in enumerate(alone):
        torch.testing.assert_close(hidden[i], one.hidden[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(anchor[i], one.anchor[0], rtol=1e-4, atol=1e-5)
    # the anchor is the prompt's last token: its distribution is the first answer token's
    # under a plain forward of the prompt alone
    prompt_only = base(input_ids=torch.tensor([seqs[0][: n[0]]])).logits[0, -1]
    torch.testing.assert_close(anchor[0], torch.log_softmax(prompt_only.float(), -1), rtol=1e-4, atol=1e-5)
    assert together[0].scored[0].sum().item() == len(seqs[0]) - n[0]  # every answer token scored once


def test_the_scored_positions_are_those_that_predict_the_answer_tokens():
    from tasks.drift import states

    ids, mask, scored = states.padded([[7, 8, 9, 10, 11], [7, 8, 9]], [2, 2], pad_id=0)
    # sequence 0: prompt 7 8, answer 9 10 11: positions 1, 2, 3 predict them
    assert scored.tolist() == [[0, 1, 1, 1, 0], [0, 1, 0, 0, 0]]
    assert ids.tolist() == [[7, 8, 9, 10, 11], [7, 8, 9, 0, 0]] and mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="sequence 0: a prompt of 6 tokens"):
        states.padded([[1, 2]], [6], pad_id=0)


def test_a_model_against_itself_has_no_drift_and_a_moved_one_has_some(tiny):
    from tasks.drift import states

    tok, base, moved, seqs, n = tiny

    def read(model):
        return states.forward(model, seqs, n, tok.pad_token_id, batch_size=3)

    same = states.compare({"a": read(base), "b": read(base)}, [("a", "b")])["a", "b"]
    assert same.kl_forward.abs().max() < 1e-6 and same.js.abs().max() < 1e-6 and same.sequence_kl.abs().max() < 1e-5
    assert same.cosine.min() > 1 - 1e-6 and all(j.min() == 1.0 for j in same.jaccard.values())
    assert sg.linear_cka(same.hidden_x, same.hidden_y) == pytest.approx(1.0)
    both = states.compare({"base": read(base), "moved": read(moved)}, [("base", "moved"), ("moved", "base")])
    pair = both["base", "moved"]
    torch.testing.assert_close(both["moved", "base"].kl_forward, pair.kl_reverse)  # one read, both directions
    # the directions pinned against the batches themselves: forward KL is KL(p_base ‖ p), the
    # sequence KL sums KL(π_base ‖ π) over the answer's positions
    bx, by = list(read(base)), list(read(moved))
    want_kl = torch.cat([sg.kl(a.anchor, b.anchor) for a, b in zip(bx, by)])
    want_seq = torch.cat([(sg.kl(a.answer, b.answer) * a.scored).sum(-1) for a, b in zip(bx, by)])
    torch.testing.assert_close(pair.kl_forward, want_kl.double() if pair.kl_forward.dtype == torch.float64 else want_kl)
    torch.testing.assert_close(pair.sequence_kl, want_seq.to(pair.sequence_kl.dtype))
    # a pair asked twice (the first checkpoint's previous is the base) is read and counted once
    twice = states.compare({"base": read(base), "moved": read(moved)}, [("base", "moved"), ("base", "moved")])
    assert len(twice) == 1 and len(twice["base", "moved"].js) == len(seqs)
    torch.testing.assert_close(twice["base", "moved"].hidden_y, pair.hidden_y)
    assert len(pair.kl_forward) == len(seqs)
    assert (pair.kl_forward > 0).all() and (pair.kl_reverse > 0).all() and (pair.js > 0).all()
    assert not torch.allclose(pair.kl_forward, pair.kl_reverse)  # KL is not symmetric
    # the sequence KL sums the anchor's KL with the answer's later positions
    assert (pair.sequence_kl >= pair.kl_forward - 1e-9).all() and (pair.sequence_kl > pair.kl_forward).any()
    assert pair.cosine.max() < 1.0 and torch.equal(pair.hidden_x, same.hidden_x)
    torch.testing.assert_close(pair.entropy_x, same.entropy_x)


def test_reading_states_normed_again_is_refused(tiny):
    """§5's first author bug: the final norm applied twice. A model whose last hidden state
    is not what lm_head reads is refused, naming the model."""
    from tasks.drift import states

    tok, base, _, seqs, n = tiny

    class NormedAgain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, **kw):
            out = self.inner(**kw)
            out.hidden_states = (*out.hidden_states[:-1], self.inner.model.norm(out.hidden_states[-1]))
            return out

    with pytest.raises(ValueError, match="sft-4: lm_head"):
        next(states.forward(NormedAgain(base), seqs, n, tok.pad_token_id, what="sft-4"))


# ---------------------------------------------------------------- the stopping rule (docs/monitor.md)


def test_the_rule_stops_before_the_first_interval_below_half_the_best_efficiency():
    from tasks.drift import monitor

    # ID: 0 -> .30 -> .50 -> .55 -> .56; drift: 0 -> .1 -> .2 -> .4 -> .8
    acc, drift = [0.0, 0.30, 0.50, 0.55, 0.56], [0.0, 0.1, 0.2, 0.4, 0.8]
    assert monitor.efficiencies(acc, drift) == pytest.approx([3.0, 2.0, 0.25, 0.025])
    assert monitor.select(acc, drift) == 2  # interval 3 (0.25 < 0.5 x 3.0): stop at its start
    assert monitor.select(acc, drift, rho=0.05) == 3  # a laxer threshold stops later
    steady = [0.0, 0.1, 0.2, 0.3]
    assert monitor.select(steady, steady) == 3  # efficiency never falls: the last checkpoint


def test_the_rule_stops_strictly_below_and_only_once_an_efficiency_was_positive():
    from tasks.drift import monitor

    # efficiencies 2, then exactly 0.5 x 2 (binary fractions: no rounding): not below, no
    # stop; then 0.125: stop before it
    assert monitor.efficiencies([0.0, 0.25, 0.375, 0.390625], [0.0, 0.125, 0.25, 0.375]) == [2.0, 1.0, 0.125]
    assert monitor.select([0.0, 0.25, 0.375, 0.390625], [0.0, 0.125, 0.25, 0.375]) == 2
    # a first interval that loses ID accuracy (efficiency -1) is no best to fall from
    assert monitor.select([0.2, 0.1, 0.3, 0.35], [0.0, 0.1, 0.2, 0.3]) == 2


def test_the_rule_reads_nothing_of_later_checkpoints_and_skips_intervals_without_drift():
    from tasks.drift import monitor

    acc, drift = [0.0, 0.30, 0.50, 0.55, 0.56], [0.0, 0.1, 0.2, 0.4, 0.8]
    pick = monitor.select(acc, drift)
    # whatever comes after the stopping interval, the pick is the same (an online rule)
    assert monitor.select(acc + [0.9, 0.95], drift + [0.81, 0.82]) == pick
    # drift that does not grow spends nothing: such an interval never stops SFT
    assert monitor.efficiencies([0.0, 0.3, 0.1], [0.0, 0.1, 0.1]) == [pytest.approx(3.0), None]
    assert monitor.select([0.0, 0.3, 0.1, 0.4], [0.0, 0.1, 0.1, 0.2]) == 3
    # an interval that loses ID accuracy while drifting stops it
    assert monitor.select([0.0, 0.3, 0.2], [0.0, 0.1, 0.2]) == 1
    with pytest.raises(ValueError, match="3 accuracies for 2 drift values"):
        monitor.select([0.0, 0.1, 0.2], [0.0, 0.1])


def test_loss_rules_pick_the_lowest_value_and_skip_missing_ones():
    from tasks.drift import monitor

    assert monitor.lowest([None, 2.0, 1.5, 1.5, 1.7]) == 2  # the first of ties; the base has no training loss
    assert monitor.lowest([None, float("nan")]) is None


def test_spearman_with_a_bootstrap_interval_over_checkpoints():
    from tasks.drift import monitor

    up = monitor.spearman([1, 2, 3, 4, 5, 6], [0.1, 0.2, 0.25, 0.3, 0.5, 0.6])
    assert up.rho == 1.0 and up.ci_low == pytest.approx(1.0) and up.n == 6  # every resample is monotone too
    noisy = monitor.spearman([1, 2, 3, 4, 5, 6, 7, 8], [0.3, 0.1, 0.4, 0.2, 0.6, 0.3, 0.5, 0.4])
    assert -1 < noisy.ci_low < noisy.rho < noisy.ci_high <= 1
    assert monitor.spearman([1, 2, 3, 4, 5, 6, 7, 8], [0.3, 0.1, 0.4, 0.2, 0.6, 0.3, 0.5, 0.4]) == noisy  # seeded
    down = monitor.spearman([1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1])
    assert down.rho == -1.0
    assert math.isnan(monitor.spearman([1, 2], [0.1, 0.2]).rho)  # fewer than 3 checkpoints
    assert math.isnan(monitor.spearman([1, 1, 1], [0.1, 0.2, 0.3]).rho)  # a constant signal
    assert monitor.spearman([1, float("nan"), 3, 4], [0.1, 0.5, 0.3, 0.4]).n == 3  # a missing value drops its checkpoint


# ---------------------------------------------------------------- the stage


def test_previous_is_the_save_before_on_the_checkpoints_own_trajectory():
    from tasks import drift

    rows = [
        {"ckpt_id": "base", "stage": "base", "step": 0},
        {"ckpt_id": "sft-2", "stage": "sft", "step": 2},
        {"ckpt_id": "sft-4", "stage": "sft", "step": 4},
        {"ckpt_id": "rl-2-1", "stage": "rl", "step": 1, "rl_start_step": 2},
        {"ckpt_id": "rl-4-1", "stage": "rl", "step": 1, "rl_start_step": 4},
        {"ckpt_id": "rl-4-2", "stage": "rl", "step": 2, "rl_start_step": 4},
    ]
    by = {r["ckpt_id"]: r for r in rows}
    assert [drift.previous(by[c], rows)["ckpt_id"] for c in ("sft-2", "sft-4", "rl-2-1", "rl-4-1", "rl-4-2")] == ["base", "sft-2", "sft-2", "sft-4", "rl-4-1"]
    with pytest.raises(ValueError, match="no checkpoint before rl-9-1"):
        drift.previous({"ckpt_id": "rl-9-1", "stage": "rl", "step": 1, "rl_start_step": 9}, rows)


def study_like_tables():
    """An SFT trajectory whose ID accuracy saturates while OOD drift keeps growing; its OOD
    accuracy peaks at sft-3, after the rule's pick (the monitor never reads it)."""
    import polars as pl

    steps = [0, 1, 2, 3, 4]
    ids = ["base", "sft-1", "sft-2", "sft-3", "sft-4"]
    checkpoints = pl.DataFrame({"ckpt_id": ids, "stage": ["base"] + ["sft"] * 4, "step": steps, "train_loss": [None, 2.0, 1.2, 0.9, 0.8]})
    acc_id, acc_ood, ce_id = [0.0, 0.30, 0.50, 0.55, 0.56], [0.05, 0.20, 0.25, 0.30, 0.10], [3.0, 2.0, 1.5, 1.2, 1.1]
    summary = pl.DataFrame(
        [{"ckpt_id": c, "split": "id", "accuracy": a, "ce": e} for c, a, e in zip(ids, acc_id, ce_id)]
        + [{"ckpt_id": c, "split": "ood", "accuracy": a, "ce": 1.0} for c, a in zip(ids, acc_ood)]
    )
    js = [0.1, 0.2, 0.4, 0.8]
    drift = pl.DataFrame([{"ckpt_id": c, "split": "ood", "reference": "base", "js": v} for c, v in zip(ids[1:], js)] + [{"ckpt_id": c, "split": "id", "reference": "base", "js": 9.0} for c in ids[1:]])
    return drift, summary, checkpoints


def test_selection_applies_the_rule_to_the_tables_and_sets_its_pick_beside_the_others():
    from tasks import drift

    table = drift.selection(*study_like_tables(), signal="js", rho=0.5)
    picks = {r["rule"]: (r["ckpt_id"], r["accuracy_ood"]) for r in table.iter_rows(named=True)}
    assert picks == {
        "monitor": ("sft-2", 0.25),  # the rule's pick (efficiencies 3, 2, 0.25: stop before the third)
        "lowest_id_ce": ("sft-4", 0.10),
        "lowest_train_loss": ("sft-4", 0.10),
        "last": ("sft-4", 0.10),
        "oracle": ("sft-3", 0.30),
    }
    assert table.filter(pl_rule("monitor"))["signal"].to_list() == ["js"]  # the ID-split drift (9.0) is not read
    # the rule reads no OOD accuracy: reversed, it moves the oracle, not the pick
    import polars as pl

    d, summary, checkpoints = study_like_tables()
    flipped = summary.with_columns(accuracy=pl.when(pl.col("split") == "ood").then(0.5 - pl.col("accuracy")).otherwise(pl.col("accuracy")))
    again = {r["rule"]: r["ckpt_id"] for r in drift.selection(d, flipped, checkpoints, signal="js", rho=0.5).iter_rows(named=True)}
    assert again["monitor"] == "sft-2" and again["oracle"] == "base"
    # a checkpoint without its drift (a failed task): no pick, not a rule over a merged interval
    holed = drift.selection(d.filter(pl.col("ckpt_id") != "sft-3"), summary, checkpoints, signal="js", rho=0.5)
    assert "monitor" not in set(holed["rule"]) and "lowest_id_ce" in set(holed["rule"])


def pl_rule(name):
    import polars as pl

    return pl.col("rule") == name


def test_correlations_rank_each_signal_against_ood_accuracy():
    from tasks import drift

    d, summary, checkpoints = study_like_tables()
    table = drift.correlations(d.with_columns(**{c: d["js"] for c in drift.DRIFT_SIGNALS if c != "js"}), summary, checkpoints)
    js = table.filter(table["signal"] == "js").row(0, named=True)
    # OOD accuracy over sft-1..4: .20 .25 .30 .10; JS rises: ρ = 1 - 6·12/60 = -0.2
    assert js["n_checkpoints"] == 4 and js["spearman_rho"] == pytest.approx(-0.2)
    assert set(table["source"]) == {"drift", "eval"}


@pytest.mark.timeout(600)
def test_a_study_with_the_monitor_measures_every_checkpoint_once_and_reruns_cached(prefect_api, smoke_study, tmp_path, capsys):
    """The smoke study with `drift.enabled`: one drift task per SFT and RL checkpoint (the
    rest of the study found cached under the new name), both references and both splits per
    checkpoint, the base's answers generated once, the picks, correlations and B / S / R's
    hidden tables published; a second run measures nothing again."""
    import json

    import polars as pl

    from flows.study import study
    from tests.conftest import copy_study, study_tables

    copy = copy_study(smoke_study, tmp_path)
    overrides = ["name=smoke-drift", "drift.enabled=true", "drift.prompts=8"]
    assert study(config_path=str(copy.config), overrides=overrides, return_state=True).is_completed()
    t = study_tables(copy.store, "smoke-drift")
    ckpts = t["checkpoints"].filter(pl.col("stage") != "base")
    d = t["drift_by_checkpoint"]
    assert d.height == ckpts.height * 2 * 2 and set(d["ckpt_id"]) == set(ckpts["ckpt_id"])
    assert (d["n_prompts"] == 8).all()
    first = d.filter((pl.col("ckpt_id") == "sft-2"))  # its previous checkpoint is the base
    by_ref = {(r["split"], r["reference"]): r for r in first.iter_rows(named=True)}
    for split in ("id", "ood"):
        assert by_ref[split, "previous"]["ref_id"] == "base"
        assert by_ref[split, "previous"]["js"] == pytest.approx(by_ref[split, "base"]["js"])
    later = d.filter((pl.col("ckpt_id") == "sft-4") & (pl.col("reference") == "previous"))
    assert set(later["ref_id"]) == {"sft-2"}
    assert (d.filter(pl.col("reference") == "base")["js"] > 0).all()  # trained weights moved
    manifests = [json.loads(m.read_text()) for m in (copy.store / "drift").glob("*/manifest.json")]
    assert sum(m.get("config", {}).get("kind") == "base_answers" for m in manifests) == 1
    assert set(t["drift_selection"]["rule"]) == {"monitor", "lowest_id_ce", "lowest_train_loss", "last", "oracle"}
    assert "js" in t["drift_correlations"]["signal"].to_list()
    # B, S and R (analysis.md §5): the svd stage's roles, read on the same 8 prompts; Δ is
    # the pair values' difference in the direction of closer to B
    roles = dict(t["checkpoint_roles"].select("role", "ckpt_id").rows())
    hp, hr = t["hidden_pair_metrics"], t["hidden_recovery"]
    assert "R" in roles and set(hp.select("model_x", "x_id").unique().rows()) == {(r, roles[r]) for r in "BSR"}
    assert (hp["n_prompts"] == 8).all() and (hp["run_id"] == "smoke-drift").all()
    value = {(r["split"], r["model_y"], r["metric"]): r["value"] for r in hp.filter(pl.col("model_x") == "B").iter_rows(named=True)}
    for r in hr.filter(pl.col("metric").is_in(["js", "cosine_mean"])).iter_rows(named=True):
        sign = -1 if r["metric"] == "js" else 1
        assert r["delta"] == pytest.approx(sign * (value[r["split"], "R", r["metric"]] - value[r["split"], "S", r["metric"]])) and 0 <= r["win_rate"] <= 1
    assert "## Hidden states of B, S and R" in (copy.store / "studies" / "smoke-drift" / "report" / "report.md").read_text()
    from tasks import drift

    assert not drift.READS._kept  # the thread runner's kept model reads are let go once the stage ends
    # the report judges the fifth finding from those tables (docs/verdicts.md, monitor)
    md = (copy.store / "studies" / "smoke-drift" / "report" / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| A label-free signal"))
    assert "the monitor picks step" in line and "no data" not in line, line

    # watched live: a Prefect table that grew by one row per checkpoint, and a status line
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["smoke-drift-drift-monitor"])))
    sizes = sorted(len(json.loads(a.data) if isinstance(a.data, str) else a.data) for a in versions)
    assert sizes == list(range(1, ckpts.height + 1)), sizes
    from flows import cli

    assert cli.main(["status", str(copy.config), *(x for o in overrides for x in ("--set", o))]) == 0
    status = capsys.readouterr().out
    assert "drift" in status and "last: " in status and "OOD JS from the base" in status, status

    # the pre-run space estimate of the stage holds what it wrote, to 25 %
    from tests.test_preflight import printed, written

    assert cli.main(["validate", str(copy.config), *(x for o in overrides for x in ("--set", o))]) == 0
    estimate, wrote = printed(capsys.readouterr().out)["drift"], written(copy.store)["drift"]
    assert abs(estimate / wrote - 1) <= 0.25, (estimate, wrote)

    before = sorted(p.name for p in (copy.store / "drift").iterdir())
    built = {p: p.stat().st_mtime_ns for p in (copy.store / "drift").glob("*/hidden_*.parquet")}
    assert len(built) == 2 * 2  # the hidden task's two tables, and their copy in the study-wide artifact
    assert study(config_path=str(copy.config), overrides=overrides, return_state=True).is_completed()
    assert sorted(p.name for p in (copy.store / "drift").iterdir()) == before
    assert {p: p.stat().st_mtime_ns for p in built} == built  # nothing rebuilt in place

    # the study pointed at a config without the monitor keeps no stale picks to judge
    off = ["--set", "name=smoke-drift", "--set", "drift.enabled=false", "--force"]
    assert cli.main(["run", str(copy.config), *off]) == 0
    assert not any((copy.store / "studies" / "smoke-drift" / "tables" / f"{n}.parquet").exists() for n in ("drift_by_checkpoint", "drift_selection", "drift_correlations", "hidden_pair_metrics", "hidden_recovery"))
    md = (copy.store / "studies" / "smoke-drift" / "report" / "report.md").read_text()
    assert "no drift stage (drift.enabled is off)" in md


# ---------------------------------------------------------------- B, S and R (analysis.md §5)


def test_mmd2_permutation_p_value_counts_the_observed_labelling_and_ties():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    far = torch.randn(8, 3, generator=g, dtype=torch.float64) + 4.0
    mmd2, p = sg.rbf_mmd2_permutation(x, far, permutations=200)
    assert mmd2 == pytest.approx(mmd2_by_loops(x, far), rel=1e-9) and mmd2 == pytest.approx(sg.rbf_mmd2(x, far), rel=1e-12)
    assert p == pytest.approx(1 / 201)  # no relabelling separates them as well: (1 + 0) / (1 + P)
    # each relabelling's MMD² is the loop estimator of its split of the pooled rows
    k, n = sg.rbf_kernel(x, far)
    pooled = torch.cat([x, far])
    perm = torch.randperm(len(pooled), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros((1, len(pooled)), dtype=torch.float64)
    mask[0, perm[:n]] = 1.0
    relabelled = float(sg.mmd2_of_kernel(k, mask)[0])
    # the same pooled rows, so the loops find the same bandwidth
    assert relabelled == pytest.approx(mmd2_by_loops(pooled[mask[0] == 1], pooled[mask[0] == 0]), rel=1e-9)
    # one distribution: the p-value is the share of seeded relabellings at least as far apart,
    # counted here by the loop estimator over the same relabellings
    same = torch.randn(8, 3, generator=g, dtype=torch.float64)
    observed, p_same = sg.rbf_mmd2_permutation(x, same, permutations=50)
    both = torch.cat([x, same])
    perms = torch.Generator().manual_seed(sg.MMD_SEED)
    at_least = 0
    for _ in range(50):
        inside = torch.zeros(len(both), dtype=torch.bool)
        inside[torch.randperm(len(both), generator=perms)[: len(x)]] = True
        at_least += mmd2_by_loops(both[inside], both[~inside]) >= observed - 1e-12
    assert p_same == pytest.approx((1 + at_least) / 51) and 0.05 < p_same < 1
    assert sg.rbf_mmd2_permutation(x, same, permutations=50) == (observed, p_same)  # seeded
    # every row the same point: every relabelling ties the observed 0, and a tie counts
    assert sg.rbf_mmd2_permutation(torch.ones(5, 3), torch.ones(4, 3), permutations=20) == (0.0, 1.0)


def test_hidden_tables_compare_s_and_r_with_b_and_point_recovery_towards_b(tiny):
    import polars as pl

    from tasks import drift
    from tasks.drift import hidden, states

    tok, base, moved, seqs, n = tiny
    answers = pl.DataFrame({"split": ["id"] * len(seqs) + ["ood"] * len(seqs), "index": [*range(len(seqs))] * 2, "ids": seqs * 2, "n_prompt": n * 2})
    # R is B itself: RL "recovered" all the way, S moved away
    models = {"b": base, "s": moved, "r": base}
    pairs, rec = hidden.tables(drift.reading(models, tok.pad_token_id, 3), {"B": "b", "S": "s", "R": "r"}, answers, "t", "tiny")
    assert set(pairs.filter(pl.col("model_x") != pl.col("model_y")).select("model_x", "model_y").unique().rows()) == {("B", "S"), ("B", "R")}
    assert (pairs["n_prompts"] == len(seqs)).all() and set(pairs["split"]) == {"id", "ood"}
    assert {f"jaccard_top{k}" for k in range(1, 51)} <= set(pairs["metric"])
    v = {(r["split"], r["model_x"], r["model_y"], r["metric"]): r["value"] for r in pairs.iter_rows(named=True)}
    direct = states.compare({"b": states.forward(base, seqs, n, tok.pad_token_id), "s": states.forward(moved, seqs, n, tok.pad_token_id)}, [("b", "s")])["b", "s"]
    assert v["id", "B", "S", "kl_forward"] == pytest.approx(float(direct.kl_forward.mean()), rel=1e-5)
    assert v["id", "B", "S", "kl_reverse"] == pytest.approx(float(direct.kl_reverse.mean()), rel=1e-5)
    assert v["id", "B", "S", "cka"] == pytest.approx(sg.linear_cka(direct.hidden_x, direct.hidden_y), rel=1e-6)
    assert v["id", "B", "R", "cosine_mean"] == pytest.approx(1.0) and v["id", "B", "R", "js"] == pytest.approx(0.0, abs=1e-7)
    assert 0 < v["id", "B", "S", "mmd2_p_value"] <= 1
    # each model's own entropy and margin once: R's equal B's, S's differ
    own = pairs.filter(pl.col("model_x") == pl.col("model_y"), pl.col("split") == "id")
    assert sorted(own.select("model_x", "metric").rows()) == sorted((m, k) for m in "BSR" for k in ("entropy", "margin"))
    assert v["id", "R", "R", "entropy"] == pytest.approx(v["id", "B", "B", "entropy"]) and v["id", "S", "S", "entropy"] != pytest.approx(v["id", "B", "B", "entropy"])
    r = {(x["split"], x["metric"]): x for x in rec.iter_rows(named=True)}
    assert "mmd2_p_value" not in {m for _, m in r}
    # closer to B is positive for a similarity and for a distance, normalised by (B, S)
    assert r["id", "cosine_mean"]["delta"] == pytest.approx(1.0 - v["id", "B", "S", "cosine_mean"])
    assert r["id", "js"]["delta"] == pytest.approx(v["id", "B", "S", "js"], abs=1e-7) and r["id", "js"]["delta_norm"] == pytest.approx(1.0, abs=1e-5)
    assert r["id", "cka"]["delta"] > 0 and r["id", "mmd2"]["delta"] > 0
    # R closer on every prompt: win-rate 1 where a metric is per prompt, none where it is not
    assert r["id", "cosine_mean"]["win_rate"] == 1.0 and r["id", "js"]["win_rate"] == 1.0 and r["id", "kl_forward"]["win_rate"] == 1.0
    assert r["id", "cka"]["win_rate"] is None and r["id", "cosine_p10"]["win_rate"] is None
    assert r["id", "jaccard_top10"]["delta"] >= 0 and any(r["id", f"jaccard_top{k}"]["delta"] > 0 for k in hidden.JACCARD_KS)  # a similarity
    # R and S both moved, differently: each metric's Δ and win-rate are §5's on the pairs
    # as compare reads them
    g = torch.Generator().manual_seed(2)
    other = copy.deepcopy(base)
    with torch.no_grad():
        for q in other.parameters():
            q.add_(0.08 * q.std() * torch.randn(q.shape, generator=g))
    mixed, mixed_rec = hidden.tables(drift.reading({"b": base, "s": moved, "r": other}, tok.pad_token_id, 3), {"B": "b", "S": "s", "R": "r"}, answers, "t", "tiny")
    read = {name: states.forward(m, seqs, n, tok.pad_token_id, 3) for name, m in (("b", base), ("s", moved), ("r", other))}
    got = states.compare(read, [("b", "s"), ("b", "r")], hidden.JACCARD_KS)
    per = {pair: hidden.per_prompt(got[pair]) for pair in got}
    rows = {x["metric"]: x for x in mixed_rec.filter(pl.col("split") == "ood").iter_rows(named=True)}
    for metric, series in per["b", "s"].items():
        name = "cosine_mean" if metric == "cosine" else metric
        assert rows[name]["win_rate"] == pytest.approx(sg.win_rate(metric, series, per["b", "r"][metric])), metric
        assert rows[name]["delta"] == pytest.approx(sg.recovery(metric, float(series.mean()), float(per["b", "r"][metric].mean()))[0], rel=1e-6, abs=1e-12), metric
    assert len({round(x["win_rate"], 6) for x in rows.values() if x["win_rate"] is not None}) > 2  # the metrics disagree: each its own
    # RL that moved further than SFT: recovery is negative, won on no prompt
    _, away = hidden.tables(drift.reading({"b": base, "s": base, "r": moved}, tok.pad_token_id, 3), {"B": "b", "S": "s", "R": "r"}, answers, "t", "tiny")
    a = {(x["split"], x["metric"]): x for x in away.iter_rows(named=True)}
    assert a["ood", "js"]["delta"] < 0 and a["ood", "cosine_mean"]["delta"] < 0 and a["ood", "js"]["win_rate"] == 0.0
    # B = S (the last SFT checkpoint is the OOD-best): distances 0 up to rounding, no Δ norm
    _, same = hidden.tables(drift.reading({"b": base, "r": moved}, tok.pad_token_id, 3), {"B": "b", "S": "b", "R": "r"}, answers, "t", "tiny")
    assert same["delta_norm"].null_count() == same.height and same.filter(pl.col("metric") == "js")["delta"].max() < 0
    # no R (no RL run from the configured start): the (B, S) pair alone, no recovery
    only, none = hidden.tables(drift.reading({"b": base, "s": moved}, tok.pad_token_id, 3), {"B": "b", "S": "s"}, answers, "t", "tiny")
    assert set(only.filter(pl.col("model_x") != pl.col("model_y"))["model_y"]) == {"S"} and none.height == 0


def _batch(rows: int = 2, width: int = 3, vocab: int = 5):
    from tasks.drift import states

    return states.Batch(torch.zeros(rows, 4), torch.zeros(rows, vocab), torch.zeros(rows, width, vocab), torch.ones(rows, width))


def test_kept_reads_are_returned_without_reading_and_the_budget_drops_the_least_recent():
    from tasks.drift import states

    one = sum(t.element_size() * t.nelement() for t in (lambda b: (b.hidden, b.anchor, b.answer, b.scored))(_batch()))
    reads = states.Reads(states.Reads.WORKING_SET * one)  # room for six reads of this size
    calls = []

    def read(name):
        def go():
            calls.append(name)
            yield _batch()

        return go

    def get(name, size=one):
        return list(reads.get(name, lambda: size, read(name)))

    assert len(get("a")) == 1
    get("a")
    assert calls == ["a"]  # kept: not read again
    for name in "bcdef":
        get(name)
    get("a")  # a is now the most recent
    get("g")  # a seventh: b, the least recent, is dropped
    calls.clear()
    for name in "acdefg":
        get(name)
    assert calls == []
    get("b")
    assert calls == ["b"]
    # a read of more than budget / 6, or without a key: streamed as read, never kept
    streamed = reads.get("big", lambda: one + 1, read("big"))
    assert not isinstance(streamed, list) and len(list(streamed)) == 1
    get("big", one + 1)
    get(None)
    get(None)
    assert calls == ["b", "big", "big", None, None]
    # the estimate counts the batches' floats (that kept batches move to the CPU: the CUDA test)
    assert states.read_bytes([[1, 2, 3, 4, 5]] * 2, [2, 2], vocab=5, hidden=4, batch_size=2) == one


def test_a_checkpoints_task_reads_only_its_own_model_when_the_references_are_kept(tiny, tmp_path, monkeypatch):
    import polars as pl

    from rlheal.config import parse_config
    from tasks import drift
    from tasks.drift import states

    tok, base, moved, seqs, n = tiny
    base.save_pretrained(tmp_path / "base")
    moved.save_pretrained(tmp_path / "moved")
    names = ["base", "sft-1", "sft-2", "sft-3", "sft-4"]
    ckpts = {c: {"ckpt_id": c, "stage": "base" if c == "base" else "sft", "step": i, "path": str(tmp_path / ("base" if i % 2 == 0 else "moved")), "content_hash": f"h{i}"} for i, c in enumerate(names)}
    ood = slice(0, len(seqs) - 2)  # other sequences than the ID split's: a key without them would mix the splits
    answers = pl.DataFrame({"split": ["id"] * len(seqs) + ["ood"] * (len(seqs) - 2), "index": [*range(len(seqs)), *range(len(seqs) - 2)], "ids": seqs + seqs[ood], "n_prompt": n + n[ood]})
    cfg = parse_config({"name": "t", "drift": {"enabled": True, "batch_size": 3}})
    loads = []
    real = drift.load
    monkeypatch.setattr(drift, "load", lambda cfg, c: loads.append(c["ckpt_id"]) or real(cfg, c))
    config = base.config.get_text_config()
    one = max(states.read_bytes(s, k, config.vocab_size, config.hidden_size, 3) for s, k in ((seqs, n), (seqs[ood], n[ood])))
    # the budget of exactly one task's six reads: a chain of tasks must not thrash
    monkeypatch.setattr(drift, "READS", states.Reads(states.Reads.WORKING_SET * one))

    def task(i: int) -> pl.DataFrame:
        loads.clear()
        return drift.measure(drift.Reader(cfg, ckpts, tok.pad_token_id), answers, ckpts[names[i]], {"base": ckpts["base"], "previous": ckpts[names[i - 1]]})

    first = task(1)
    want = drift.measure(drift.reading({"base": base, "sft-1": moved}, tok.pad_token_id, 3), answers, ckpts["sft-1"], {"base": ckpts["base"], "previous": ckpts["base"]})
    assert first.equals(want)  # a kept read changes no value
    assert sorted(loads) == ["base", "sft-1"]
    by_split = {r["split"]: r for r in first.filter(pl.col("reference") == "base").iter_rows(named=True)}
    assert (by_split["id"]["n_prompts"], by_split["ood"]["n_prompts"]) == (len(seqs), len(seqs) - 2)
    assert by_split["id"]["js"] != by_split["ood"]["js"]
    for i in (2, 3, 4):  # each next task: the base and its previous are kept, only its own weights read
        table = task(i)
        assert loads == [names[i]], (i, loads)
    assert table.equals(drift.measure(drift.reading({"base": base, "sft-3": moved, "sft-4": base}, tok.pad_token_id, 3), answers, ckpts["sft-4"], {"base": ckpts["base"], "previous": ckpts["sft-3"]}))
    # the key is the content: the same id with new weights is read again, the same weights
    # under another id are not
    ckpts["sft-4"] = {**ckpts["sft-4"], "content_hash": "retrained"}
    task(4)
    assert loads == ["sft-4"]
    ckpts["sft-5"] = {**ckpts["sft-3"], "ckpt_id": "sft-5", "step": 5}
    names.append("sft-5")
    drift.measure(drift.Reader(cfg, ckpts, tok.pad_token_id), answers, ckpts["sft-5"], {"base": ckpts["base"], "previous": ckpts["sft-4"]})
    assert loads == ["sft-4"]  # loads cleared by task(4) only: sft-5 (= sft-3's weights) and the rest were kept
    # a budget too small for either split's six reads keeps nothing: every task loads what it reads
    smallest = min(states.read_bytes(s, k, config.vocab_size, config.hidden_size, 3) for s, k in ((seqs, n), (seqs[ood], n[ood])))
    monkeypatch.setattr(drift, "READS", states.Reads(states.Reads.WORKING_SET * smallest - 1))
    task(2)
    task(3)
    assert sorted(loads) == ["base", "sft-2", "sft-3"] and not drift.READS._kept


def test_measure_reads_the_references_before_the_checkpoint_on_each_split():
    """The order `Reads` relies on: the base's and the previous checkpoint's kept reads are
    the most recent when the checkpoint's own read is inserted."""
    import polars as pl

    from tasks import drift

    calls = []

    def read(c, seqs, n):
        calls.append((c, len(seqs)))
        return [_batch(vocab=64)]  # top-50 Jaccard needs 50 ids

    answers = pl.DataFrame({"split": ["id", "id", "ood"], "index": [0, 1, 0], "ids": [[1, 2, 3]] * 3, "n_prompt": [2] * 3})
    ckpt = {"ckpt_id": "sft-2", "stage": "sft", "step": 2}
    drift.measure(read, answers, ckpt, {"base": {"ckpt_id": "base"}, "previous": {"ckpt_id": "sft-1"}})
    assert calls == [("base", 2), ("sft-1", 2), ("sft-2", 2), ("base", 1), ("sft-1", 1), ("sft-2", 1)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_kept_read_on_the_cpu_compares_with_a_streamed_one_on_the_gpu(tiny):
    from tasks.drift import states

    tok, base, moved, seqs, n = tiny
    gpu = {name: m.to("cuda") for name, m in (("base", copy.deepcopy(base)), ("moved", copy.deepcopy(moved)))}
    reads = states.Reads(2**30)
    kept = reads.get(("base",), lambda: 1, lambda: states.forward(gpu["base"], seqs, n, tok.pad_token_id, 3))
    assert all(b.anchor.device.type == "cpu" for b in kept)
    mixed = states.compare({"base": kept, "moved": states.forward(gpu["moved"], seqs, n, tok.pad_token_id, 3)}, [("base", "moved")])["base", "moved"]
    streamed = states.compare({"base": states.forward(gpu["base"], seqs, n, tok.pad_token_id, 3), "moved": states.forward(gpu["moved"], seqs, n, tok.pad_token_id, 3)}, [("base", "moved")])["base", "moved"]
    torch.testing.assert_close(mixed.js, streamed.js)
    torch.testing.assert_close(mixed.sequence_kl, streamed.sequence_kl)
