"""The one renderer every stage uses to turn a conversation into token ids (GP §4, training.md §0).

SFT rows, PPO rollouts, GRPO prompts and evaluation all go through `render` and
`encode`, so a hand's prompt has the same token ids everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

Message = dict[str, str]


def render(tok, messages: Sequence[Message], add_generation_prompt: bool, date_string: str | None = "26 Jul 2024") -> str:
    """The model's own chat template, no system message added; templates that insert
    today's date (Llama 3.x) get a fixed one so prompts are byte-stable (GP §4)."""
    extra = {"date_string": date_string} if date_string is not None else {}
    return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt, **extra)


def encode(tok, text: str) -> list[int]:
    """Token ids of rendered text; the template already placed any BOS, so none is added again."""
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_completion(tok, prompt: Sequence[Message], completion: Sequence[Message], date_string: str | None) -> tuple[str, str]:
    """(prompt text, completion text): the completion is the full rendering minus the
    rendered prompt, so it carries the template's end-of-turn text (training.md §2.2)."""
    head = render(tok, prompt, True, date_string)
    full = render(tok, [*prompt, *completion], False, date_string)
    if not full.startswith(head):
        raise ValueError("the chat template does not render the prompt as a prefix of the full conversation")
    return head, full[len(head):]


def prompt_completion_ids(tok, prompt: Sequence[Message], completion: Sequence[Message], date_string: str | None) -> tuple[list[int], int]:
    """(input ids, prompt length): prompt and completion are tokenised separately so the
    label boundary never falls inside a token merged across it."""
    head, tail = prompt_completion(tok, prompt, completion, date_string)
    p = encode(tok, head)
    return p + encode(tok, tail), len(p)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int):
    """(input_ids, attention_mask) of prompts padded on the left, as generation wants them."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


def stop_token_ids(tok) -> list[int]:
    """EOS ids for generation: the tokenizer's EOS plus the template's end-of-turn tokens."""
    ids = {tok.eos_token_id}
    for name in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>"):
        tid = tok.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)
