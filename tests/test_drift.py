"""tasks/drift/signals.py: the drift stage's label-free signals (issue 19, analysis.md §5),
against values computed by hand or by a second, slower formula."""

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


def test_a_model_against_itself_has_no_drift_and_a_moved_one_has_some(tiny):
    from tasks.drift import states

    tok, base, moved, seqs, n = tiny

    def read(model):
        return states.forward(model, seqs, n, tok.pad_token_id, batch_size=3)

    same = states.compare(read(base), read(base))
    assert same.kl_forward.abs().max() < 1e-6 and same.js.abs().max() < 1e-6 and same.sequence_kl.abs().max() < 1e-5
    assert same.cosine.min() > 1 - 1e-6 and all(j.min() == 1.0 for j in same.jaccard.values())
    assert sg.linear_cka(same.hidden_x, same.hidden_y) == pytest.approx(1.0)
    pair = states.compare(read(base), read(moved))
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
