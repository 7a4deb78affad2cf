"""`rl.algorithm: ppo` — the authors' PPO, our code (training.md §3).

Reads like CleanRL's ppo.py. One update: roll out E·T attempts (rollout.py); score them
teacher-forced for L_old and V_old; bootstrap V(s_T); the GAE loop; flatten and
normalise the advantages once; `epochs` passes over shuffled minibatches (ratio, clipped
surrogate, value clipping, clipfrac, approx_kl), each minibatch one Adam step after
gradient clipping; the LR step; a save when u + 1 is listed; one `rl_log` row. The
hyperparameters are `cfg.rl.ppo` (rlheal.config.PpoSection, documented there).
No KL penalty, no entropy bonus, no reference model (§3.1).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlheal.config import PpoSection, StudyConfig
from rlheal.store import Artifact, Store
from tasks import lm
from tasks import benchmark
from tasks.rl import common
from tasks.rl.rollout import Envs, Generator, Step, rollout, success_rate

log = logging.getLogger("rlheal.rl")
KEY = '"formula":'  # GeneralPoints' answer key; each task names its own (Benchmark.action_key)
RATIO_LOG_CAP = 20.0  # exp overflow guard; above rho = 10 the loss no longer depends on rho (§3.5)


# ---------------------------------------------------------------------------- §3.1 value head


class ValueHead(nn.Module):
    """h -> h//4 -> h//8 -> 1 with ReLUs, PyTorch default init (training.md §3.1)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden // 4), nn.ReLU(), nn.Linear(hidden // 4, hidden // 8), nn.ReLU(), nn.Linear(hidden // 8, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)


def hidden_size(model) -> int:
    return model.config.get_text_config().hidden_size


# ---------------------------------------------------------------------------- §3.4 sequence score


def split_index(tok, response: list[int], key: str = KEY) -> int:
    """s = the response token holding the opening `"` of the LAST `key` (`"formula":`) in the
    decoded response, found from character offsets of decoded prefixes (never from token
    ids); no key: n - 5, or 1 when n < 7; clamped to s >= 1 (training.md §3.4)."""
    n = len(response)

    def decoded(k: int) -> str:
        return tok.decode(response[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    at = decoded(n).rfind(key)
    if at < 0:
        return max(1, 1 if n < 7 else n - 5)
    # the smallest k whose decoded prefix o_0..o_k reaches past character `at`
    lo, hi = 0, n - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decoded(mid + 1)) > at:
            hi = mid
        else:
            lo = mid + 1
    return max(1, lo)


def sequence_scores(model, head: ValueHead, steps: list[Step], splits: list[int], tau: float, p: PpoSection) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, V) of each sample from one teacher-forced forward pass over prompt + response:
    L = thought_coef * sum_{i=2}^{s-1} l_i + sum_{i=s}^{n-1} l_i, l_i = log softmax(z_i / tau)[o_i]
    (o_0 never scored); V = the value head on the final hidden state at the last prompt
    token. Used for L_old/V_old and in the update alike (§3.2, §3.4)."""
    device = next(head.parameters()).device
    B = len(steps)
    width = max(len(s.prompt) + len(s.response) for s in steps)
    keep = max(len(s.response) for s in steps)  # logits of the last `keep` positions hold every z_i
    # left padding, so every response ends at the last position (as in generate())
    ids = torch.full((B, width), 0, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    thought = torch.zeros((B, keep - 1))
    action = torch.zeros((B, keep - 1))
    for b, (step, s) in enumerate(zip(steps, splits)):
        n = len(step.response)
        ids[b, width - len(step.prompt) - n :] = torch.tensor(step.prompt + step.response)
        mask[b, width - len(step.prompt) - n :] = 1
        # kept logit j predicts the token at width - keep + j + 1; o_i sits at width - n + i
        thought[b, keep - n + 1 : keep - n + s - 1] = 1  # i = 2 .. s-1
        action[b, keep - n + s - 1 : keep - 1] = 1  # i = s .. n-1
    ids, mask = ids.to(device), mask.to(device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), output_hidden_states=True, logits_to_keep=keep)
    z = out.logits[:, :-1].float() / tau
    logp = z.gather(-1, ids[:, width - keep + 1 :, None]).squeeze(-1) - z.logsumexp(-1)
    if p.compute_dtype == "bf16":  # the authors' precision (deviation 14)
        logp = logp.bfloat16().float()
    L = p.thought_coef * (logp * thought.to(device)).sum(1) + (logp * action.to(device)).sum(1)
    last_prompt = torch.tensor([width - len(s.response) - 1 for s in steps], device=device)
    h = out.hidden_states[-1][torch.arange(B, device=device), last_prompt]
    V = _value(head, h.detach() if p.critic_detached else h)
    if p.compute_dtype == "bf16":
        V = V.bfloat16().float()
    return L, V


def _value(head: ValueHead, h: torch.Tensor) -> torch.Tensor:
    """The value head in float32, also under bf16 autocast."""
    with torch.autocast(h.device.type, enabled=False):
        return head(h.float())


@torch.no_grad()
def values_of(model, head: ValueHead, prompts: list[list[int]]) -> torch.Tensor:
    """V at the last token of each prompt: the bootstrap value V(s_T) (§3.2)."""
    device = next(head.parameters()).device
    width = max(len(q) for q in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, q in enumerate(prompts):
        ids[b, : len(q)], mask[b, : len(q)] = torch.tensor(q), 1
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
    last = torch.tensor([len(q) - 1 for q in prompts], device=device)
    return _value(head, out.hidden_states[-1][torch.arange(len(prompts), device=device), last])


# ---------------------------------------------------------------------------- §3.3 GAE, §3.5 losses


def gae(rewards, values, dones, truncations, next_value, gamma: float, lam: float, cut_at_truncation: bool = False):
    """Per environment over t = 0..T-1 ([T, E] tensors): m_{t+1} = 1 - d_t (a truncation
    keeps the mask unless cut_at_truncation), delta_t = r_t + gamma m_{t+1} V_{t+1} - V_t,
    A_t = delta_t + gamma lam m_{t+1} A_{t+1}, A_T = 0, V_T = next_value; R = A + V (§3.3)."""
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    ends = torch.maximum(dones, truncations) if cut_at_truncation else dones
    last = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        next_values = next_value if t == T - 1 else values[t + 1]
        mask = 1.0 - ends[t]
        delta = rewards[t] + gamma * mask * next_values - values[t]
        last = delta + gamma * lam * mask * last
        advantages[t] = last
    return advantages, advantages + values


def policy_loss(ratio: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """-min(rho A, clip(rho, 1 +- eps) A); when rho > 10, -clip(rho, 1 +- eps) A (§3.5)."""
    clipped = ratio.clamp(1 - clip, 1 + clip)
    loss = -torch.min(ratio * adv, clipped * adv)
    return torch.where(ratio > 10, -clipped * adv, loss)


def value_loss(v: torch.Tensor, v_old: torch.Tensor, returns: torch.Tensor, clip: float) -> torch.Tensor:
    """0.5 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-eps_v) (§3.5)."""
    v_clipped = v_old + (v - v_old).clamp(-clip, clip)
    return 0.5 * torch.max((v - returns) ** 2, (v_clipped - returns) ** 2)


def cosine_lr(u: int, p: PpoSection, t_max: int) -> float:
    """eta_u = eta_min + (eta_0 - eta_min)(1 + cos(pi u / T_max)) / 2 (§3.5)."""
    return p.lr_min + (p.learning_rate - p.lr_min) * (1 + math.cos(math.pi * u / t_max)) / 2


def precision(cuda: bool):
    """bf16 autocast over fp32 master weights on GPU (the authors' bf16 mixed precision; a
    1e-6 Adam step is below bf16 resolution, so the weights themselves stay fp32)."""
    return (lambda: torch.autocast("cuda", torch.bfloat16)) if cuda else contextlib.nullcontext


# ---------------------------------------------------------------------------- one run


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(store: Store, run: Artifact, update: int, model, tok, head: ValueHead, extra: dict) -> Artifact:
    """A standalone HF directory plus the value head in its own file (training.md §5)."""
    art = run.step(update)

    def build(tmp: Path) -> dict:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}, tmp / common.VALUE_HEAD)
        return extra

    store.build(art, build, config={"run": run.key, "step": update})
    return art


def train(store: Store, run: Artifact, cfg: StudyConfig, start: dict, exclude: set) -> list[dict]:
    """Run PPO from `start` (a checkpoints row) to rl.num_updates, resuming from the last
    resume point; returns the rl_log rows."""
    rl, p = cfg.rl, cfg.rl.ppo
    E, T = p.num_envs, p.steps_per_env
    N = E * T  # >= 2 (PpoSection): advantages are normalised over the samples of an update
    minibatch = p.minibatch_size or N
    t_max = p.lr_t_max or rl.num_updates
    decoding = rl.decoding.resolved()
    tau = decoding["temperature"] if decoding["do_sample"] else 1.0  # sampling temperature, also for L (§3.4)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    autocast = precision(cuda)

    resume = common.load_resume(run)
    weights = resume["weights"] if resume else start["path"]
    tok = lm.load_tokenizer(start["path"], cfg.model.trust_remote_code)
    model = lm.load_model(weights, torch.float32, device, cfg.model.trust_remote_code)
    model.eval()  # dropout off: rollout, L_old and the update see the same function
    torch.manual_seed(decoding["seed"])
    head = ValueHead(hidden_size(model)).to(device)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=p.learning_rate, betas=(0.9, 0.999), eps=p.adam_epsilon, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: cosine_lr(u, p, t_max) / p.learning_rate)
    envs = Envs(benchmark.of(cfg), E, lambda i: common.example_stream(cfg, exclude, i), rl.seed, cfg.verifier.mode, cfg.verifier.verify_iter)
    rows: list[dict] = []
    first, elapsed = 0, 0.0
    if resume:
        head.load_state_dict(load_file(Path(weights) / common.VALUE_HEAD, device=device))
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        envs.restore(resume["envs"])
        _set_rng_state(resume["rng"])
        rows, first, elapsed = resume["rows"], resume["update"], resume["wall_seconds"]
        log.info("rl resumes from update %d (%s)", first, weights)
    generate = Generator(model, tok, decoding, cfg.chat.date_string, autocast)
    started = time.time() - elapsed

    for update in range(first, rl.num_updates):
        # 1. rollout: T rounds of one batched generate over the E environments (§3.2)
        steps, next_prompts = rollout(envs, generate, T)
        splits = [split_index(tok, s.response, envs.bench.action_key) for s in steps]

        # 2. L_old, V_old from a separate teacher-forced pass; the bootstrap value V(s_T)
        L_old, V_old = torch.empty(N, device=device), torch.empty(N, device=device)
        with torch.no_grad(), autocast():
            for idx in torch.arange(N).split(p.micro_batch_size):
                L_old[idx], V_old[idx] = sequence_scores(model, head, [steps[i] for i in idx], [splits[i] for i in idx], tau, p)
            next_value = torch.cat([values_of(model, head, q) for q in _chunks(next_prompts, p.micro_batch_size)])

        # 3. GAE per environment (§3.3)
        rewards = torch.tensor([s.reward for s in steps], device=device).view(T, E)
        dones = torch.tensor([float(s.done) for s in steps], device=device).view(T, E)
        truncations = torch.tensor([float(s.truncated) for s in steps], device=device).view(T, E)
        advantages, returns = gae(rewards, V_old.view(T, E), dones, truncations, next_value, p.gamma, p.lam, p.cut_gae_at_truncation)

        # 4. flatten; normalise the advantages once, over all E·T samples (Bessel std)
        b_advantages, b_returns = advantages.reshape(-1), returns.reshape(-1)
        b_norm = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-5)
        has_policy = torch.tensor([len(s.response) > 1 for s in steps], device=device)  # n <= 1: no policy term

        # 5. epochs of clipped updates over shuffled minibatches, micro-batched
        stats = {"loss": [], "policy": [], "value": [], "clipped": [], "kl": []}
        critic_only = update < p.value_warmup_updates
        for _epoch in range(p.epochs):
            order = torch.randperm(N)
            for lo in range(0, N, minibatch):
                mb = order[lo : lo + minibatch]
                optimizer.zero_grad(set_to_none=True)
                for idx in mb.split(p.micro_batch_size):
                    with autocast():
                        L, V = sequence_scores(model, head, [steps[i] for i in idx], [splits[i] for i in idx], tau, p)
                    finite = torch.isfinite(L) & torch.isfinite(L_old[idx])  # skip samples with a non-finite L
                    logratio = torch.where(finite, L - L_old[idx], torch.zeros_like(L))
                    ratio = logratio.clamp(max=RATIO_LOG_CAP).exp()
                    pg = policy_loss(ratio, b_norm[idx], p.clip)
                    v = value_loss(V, V_old[idx], b_returns[idx], p.value_clip)
                    scored = finite & has_policy[idx]
                    policy_term = torch.zeros_like(pg) if critic_only else torch.where(scored, pg, 0.0)
                    per_sample = policy_term + p.value_coef * torch.where(finite, v, 0.0)
                    # mean over the minibatch; skipped samples count as zero, as the authors' per-sample loop did
                    (per_sample.sum() / len(mb)).backward()
                    with torch.no_grad():
                        stats["loss"] += per_sample[finite].tolist()
                        stats["policy"] += pg[scored].tolist()
                        stats["value"] += v[finite].tolist()
                        stats["clipped"] += ((ratio - 1).abs() > p.clip)[scored].tolist()
                        stats["kl"] += ((ratio - 1) - logratio)[scored].tolist()
                if critic_only:  # the value loss also reaches the shared backbone: keep it still
                    for w in model.parameters():
                        w.grad = None
                grad_norm = nn.utils.clip_grad_norm_(params, p.max_grad_norm)
                optimizer.step()

        # 6. the LR schedule steps once per update
        lr = scheduler.get_last_lr()[0]
        scheduler.step()

        # 7. the rl_log row; a save when update + 1 is listed (§3.5, §5)
        r = rewards.reshape(-1).cpu().numpy()
        y, y_pred = b_returns.cpu().numpy(), V_old.cpu().numpy()
        var_y = float(np.var(y))
        finished = sum(s.finished for s in steps)
        row = {
            "rl_start_step": start["step"],
            "parent": start["ckpt_id"],
            "algorithm": "ppo",
            "update": update + 1,
            "reward_mean": float(r.mean()),
            "reward_std": float(r.std(ddof=1)),
            "success_rate": success_rate(steps),
            "episodes_finished": finished,
            **{f"count_{o}": sum(s.outcome == o for s in steps) for o in envs.bench.outcomes},
            "truncations": sum(s.truncated for s in steps),
            "loss": _mean(stats["loss"]),
            # a critic-only (warm-up) update trains no policy: its ratio is 1 by construction
            "policy_loss": None if critic_only else _mean(stats["policy"]),
            "value_loss": _mean(stats["value"]),
            "clip_fraction": None if critic_only else _mean(stats["clipped"]),
            "approx_kl": None if critic_only else _mean(stats["kl"]),
            "explained_variance": None if var_y == 0 else 1 - float(np.var(y - y_pred)) / var_y,
            "grad_norm": float(grad_norm),
            "learning_rate": lr,
            "mean_response_tokens": float(np.mean([len(s.response) for s in steps])),
            "wall_seconds": time.time() - started,
            **common.advantage_distribution(b_advantages.cpu().numpy(), rl.adv_hist_bins, rl.adv_hist_range),
        }
        rows.append(row)
        log.info(
            "rl from %s update %d/%d: reward %.3f, success %s, policy %.4f, value %.4f, clipfrac %.3f, lr %.3g, %.1f s",
            start["ckpt_id"], update + 1, rl.num_updates, row["reward_mean"], row["success_rate"], row["policy_loss"] or 0.0,
            row["value_loss"] or 0.0, row["clip_fraction"] or 0.0, lr, row["wall_seconds"],
        )  # fmt: skip
        if update + 1 in rl.save_steps:
            art = save_checkpoint(store, run, update + 1, model, tok, head, {"update": update + 1, "train_loss": row["loss"], "wall_seconds": row["wall_seconds"]})
            common.save_resume(
                run,
                update + 1,
                {
                    "update": update + 1,
                    "weights": str(art.path),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "envs": envs.state(),
                    "rng": _rng_state(),
                    "rows": rows,
                    "wall_seconds": row["wall_seconds"],
                },
            )
    return rows


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _mean(values: list) -> float | None:
    return float(np.mean(values)) if values else None
