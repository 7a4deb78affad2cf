"""Stage `eval`: ID and OOD evaluation of checkpoints (training.md §7).

This module starts with the teacher-forced cross-entropy of reference answers
(training.md §7.3), which SFT also logs while it trains.
"""

from __future__ import annotations

import polars as pl
import torch

from tasks.chat import prompt_completion_ids


@torch.no_grad()
def reference_ce(model, tok, table: pl.DataFrame, n: int, date_string: str | None, batch_size: int = 64) -> float:
    """Mean over the first `n` hands of the mean NLL (nats, temperature 1) of the
    reference answer plus end-of-turn tokens, given the single-turn prompt (§7.3)."""
    rows = table.head(n)
    seqs = [
        prompt_completion_ids(tok, [{"role": "user", "content": p}], [{"role": "assistant", "content": a}], date_string)
        for p, a in zip(rows["prompt"], rows["answer"])
    ]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_hand: list[float] = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, (seq, n_prompt) in enumerate(chunk):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            scored[i, n_prompt : len(seq)] = True
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        # position t predicts token t+1
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:].to(device), reduction="none")
        target = scored[:, 1:].to(device)
        per_hand += ((nll * target).sum(1) / target.sum(1)).tolist()
    model.train(was_training)
    return float(sum(per_hand) / len(per_hand)) if per_hand else float("nan")
