"""What the drift stage reads of a model (issue 19): one teacher-forced forward pass per
prompt over the prompt and the base's own greedy answer, which gives at once
- the anchor: the prompt's last token, generation prompt included (analysis.md §5), its final
  hidden state and its next-token distribution (the first answer token's);
- the answer positions, for the sequence-level KL over that answer.
Sequences are right-padded, so every position is the one generation gives that token and
the anchor of a prompt of n tokens is position n - 1 (the authors' anchors were the last 8
tokens of the user turn, template text, and assumed right padding where it was left).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from tasks.drift import signals


def sequences(answers, split: str) -> tuple[list[list[int]], list[int]]:
    """A split's (token ids, prompt lengths) from the base's answer rows (tasks.drift.answer_rows), in prompt order."""
    part = answers.filter(answers["split"] == split).sort("index")
    return part["ids"].to_list(), part["n_prompt"].to_list()


@dataclass
class Batch:
    hidden: torch.Tensor  # (B, d) final hidden state at the anchor, fp32, on the CPU
    anchor: torch.Tensor  # (B, V) log-probs at the anchor, fp32, on the model's device (the CPU once kept: Reads)
    answer: torch.Tensor  # (B, A, V) log-probs of each answer token's position, packed from the left
    scored: torch.Tensor  # (B, A) 1 where `answer` holds a position (answers differ in length)


def padded(seqs: Sequence[Sequence[int]], n_prompt: Sequence[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, scored) of right-padded sequences; `scored[i, t]` marks a
    position whose next token is an answer token (t from n_prompt - 1 to len - 2)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    scored = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, (s, n) in enumerate(zip(seqs, n_prompt)):
        if not 0 < n <= len(s):
            raise ValueError(f"sequence {i}: a prompt of {n} tokens in a sequence of {len(s)}")
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
        scored[i, n - 1 : len(s) - 1] = 1.0
    return ids, mask, scored


@torch.no_grad()
def forward(model, seqs: Sequence[Sequence[int]], n_prompt: Sequence[int], pad_id: int, batch_size: int = 32, what: str = "model") -> Iterator[Batch]:
    """The model's `Batch`es over `seqs` (prompt + answer token ids, `n_prompt` prompt tokens
    each), in order; the first batch checks that lm_head reads the hidden state taken (§5)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(seqs), batch_size):
            chunk, n = seqs[start : start + batch_size], n_prompt[start : start + batch_size]
            ids, mask, scored = padded(chunk, n, pad_id)
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
            rows = torch.arange(len(chunk), device=device)
            at = torch.tensor([k - 1 for k in n], device=device)  # right-padded: the prompt's last token
            hidden, logits = out.hidden_states[-1][rows, at], out.logits[rows, at]
            if start == 0:
                signals.check_lm_head(hidden, logits, model.get_output_embeddings(), what)
            # only the answer's positions, packed: the full (B, T, V) would not fit for a large
            # vocabulary (Qwen's 152k ids x 450 positions x 32 prompts is 9 GB in fp32)
            width = int(scored.sum(1).max())
            pos, packed = torch.zeros((len(chunk), width), dtype=torch.long), torch.zeros((len(chunk), width))
            for i, row in enumerate(scored):
                where = row.nonzero().squeeze(1)
                pos[i, : len(where)], packed[i, : len(where)] = where, 1.0
            picked = out.logits.gather(1, pos.to(device).unsqueeze(-1).expand(-1, -1, out.logits.shape[-1]))
            yield Batch(hidden.float().cpu(), torch.log_softmax(logits.float(), -1), torch.log_softmax(picked.float(), -1), packed.to(device))
    finally:
        model.train(was_training)


def read_bytes(seqs: Sequence[Sequence[int]], n_prompt: Sequence[int], vocab: int, hidden: int, batch_size: int) -> int:
    """What `forward`'s batches over `seqs` hold, in bytes (fp32; the answer's distributions,
    one row per scored position of the batch's longest answer, dominate)."""
    total = 0
    for start in range(0, len(seqs), batch_size):
        width = max(len(s) - k for s, k in zip(seqs[start : start + batch_size], n_prompt[start : start + batch_size]))
        rows = len(seqs[start : start + batch_size])
        total += 4 * rows * ((width + 1) * vocab + width + hidden)
    return total


class Reads:
    """Models' `forward` batches, kept in this process for the drift tasks that follow: the
    base is every checkpoint's reference and each checkpoint the next one's previous, so
    once the task before has ended a checkpoint's task reads one model instead of three.

    A task reads six entries (three models, two splits), references first: a read is kept
    only when six of its size fit the `budget` (bytes), so the base's and the previous
    checkpoint's reads outlive the task's own insertions under least-recently-used eviction;
    a larger read (a large vocabulary's per-position distributions) is streamed as `forward`
    gives it and not kept. Kept batches live on the CPU (GPU memory stays the GPU lease's).
    The key must name everything the batches depend on."""

    WORKING_SET = 6

    def __init__(self, budget: int):
        self.budget = budget
        self._kept: OrderedDict[tuple, tuple[list[Batch], int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple | None, size: Callable[[], int], read: Callable[[], Iterator[Batch]]) -> Iterable[Batch]:
        """The batches under `key` if kept, else `read()`'s, kept when `size()` is at most
        budget / WORKING_SET (`key` None: never kept)."""
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key][0]
        if key is None or size() * self.WORKING_SET > self.budget:
            return read()
        batches = [Batch(*(t.cpu() for t in (b.hidden, b.anchor, b.answer, b.scored))) for b in read()]
        nbytes = sum(t.element_size() * t.nelement() for b in batches for t in (b.hidden, b.anchor, b.answer, b.scored))
        with self._lock:
            self._kept[key] = (batches, nbytes)
            self._kept.move_to_end(key)  # a concurrent miss on the same key: the latest is the most recent
            while sum(n for _, n in self._kept.values()) > self.budget:
                self._kept.popitem(last=False)
        return batches

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()

    close = clear  # contextlib.closing(reads): emptied when the block ends


@dataclass
class Pair:
    """Per-prompt signals of a model `y` against a reference `x` on the same sequences, and
    both models' anchor hidden states (for the sample-level CKA and MMD)."""

    kl_forward: torch.Tensor  # KL(p_x ‖ p_y) at the anchor
    kl_reverse: torch.Tensor  # KL(p_y ‖ p_x)
    js: torch.Tensor
    jaccard: dict[int, torch.Tensor]  # top-k token-id Jaccard, per k
    entropy_x: torch.Tensor
    entropy_y: torch.Tensor
    margin_x: torch.Tensor
    margin_y: torch.Tensor
    sequence_kl: torch.Tensor  # Σ over the answer of KL(π_x ‖ π_y), teacher-forced
    cosine: torch.Tensor
    hidden_x: torch.Tensor
    hidden_y: torch.Tensor


def compare(readers: Mapping[str, Iterator[Batch]], pairs: Sequence[tuple[str, str]], ks: Sequence[int] = signals.JACCARD_KS) -> dict[tuple[str, str], Pair]:
    """The signals of each pair (x, y) of `readers` (name -> `forward` over the same
    sequences), batch by batch: each model is read once however many pairs it is in, and only
    one batch of its full distributions is held at once."""
    pairs = list(dict.fromkeys(pairs))  # a pair asked twice (the base is also the previous checkpoint) is read once
    parts: dict[tuple[str, str], dict[str, list[torch.Tensor]]] = {pair: {} for pair in pairs}
    names = list(readers)
    for batch in zip(*readers.values(), strict=True):
        # a kept read is on the CPU; a streamed one (never kept: too large, or no key) on its
        # model's device: compare there
        device = next((b.anchor.device for b in batch if b.anchor.device.type != "cpu"), torch.device("cpu"))
        batch = [b if b.anchor.device == device else Batch(b.hidden, *(t.to(device) for t in (b.anchor, b.answer, b.scored))) for b in batch]
        read = dict(zip(names, batch))
        if any(not torch.equal(read[names[0]].scored, b.scored) for b in batch):
            raise ValueError("compare: the models were not read on the same sequences")
        for pair in pairs:
            bx, by = read[pair[0]], read[pair[1]]
            values = {
                "kl_forward": signals.kl(bx.anchor, by.anchor),
                "kl_reverse": signals.kl(by.anchor, bx.anchor),
                "js": signals.js(bx.anchor, by.anchor),
                **{f"jaccard{k}": signals.topk_jaccard(bx.anchor, by.anchor, k) for k in ks},
                "entropy_x": signals.entropy(bx.anchor),
                "entropy_y": signals.entropy(by.anchor),
                "margin_x": signals.margin(bx.anchor),
                "margin_y": signals.margin(by.anchor),
                "sequence_kl": signals.sequence_kl(bx.answer, by.answer, bx.scored),
                "cosine": signals.cosine(bx.hidden, by.hidden),
                "hidden_x": bx.hidden,
                "hidden_y": by.hidden,
            }
            for name, value in values.items():
                parts[pair].setdefault(name, []).append(value.cpu())
    out = {}
    for pair, p in parts.items():
        cat = {name: torch.cat(values) for name, values in p.items()}
        out[pair] = Pair(**{name: cat.pop(name) for name in list(cat) if not name.startswith("jaccard")}, jaccard={k: cat[f"jaccard{k}"] for k in ks})
    return out
