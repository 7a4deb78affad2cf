"""The wrong first attempt of an optional multi-turn SFT example (GP §5).

The wrong attempt is the hand's reference answer block with its formula corrupted in one
of four ways, in the spec's order: a number replaced by a value not in the hand, a number
dropped, spaces inserted, one operator changed. The kind and its details come from an
RNG keyed like GP §2 with the prefix `generalpoints-sft-wrong`.
"""

from __future__ import annotations

import re

from tasks.generalpoints.cards import Hand, hand_rng
from tasks.generalpoints.prompt import TARGET, answer_block
from tasks.generalpoints.verifier import score

_TOKEN = re.compile(r"\d+|[+\-*/()]")
_OPERATORS = "+-*/"


def _replace_number(tokens, hand, rng):
    position = rng.choice([i for i, t in enumerate(tokens) if t.isdigit()])
    # 1..13 covers the J/Q/K values of the other rule: the typical real mistake.
    value = rng.choice([v for v in range(1, 14) if v not in hand.numbers])
    return tokens[:position] + [str(value)] + tokens[position + 1 :]


def _drop_number(tokens, hand, rng):
    position = rng.choice([i for i, t in enumerate(tokens) if t.isdigit()])
    # Drop the number with one adjacent operator so the rest stays a well-formed formula;
    # every number of a solver string has an operator on at least one side.
    if position + 1 < len(tokens) and tokens[position + 1] in _OPERATORS:
        return tokens[:position] + tokens[position + 2 :]
    return tokens[: position - 1] + tokens[position + 1 :]


def _insert_spaces(tokens, hand, rng):
    return [f" {t} " if t in _OPERATORS else t for t in tokens]


def _change_operator(tokens, hand, rng):
    position = rng.choice([i for i, t in enumerate(tokens) if t in _OPERATORS])
    operator = rng.choice([o for o in _OPERATORS if o != tokens[position]])
    return tokens[:position] + [operator] + tokens[position + 1 :]


CORRUPTIONS = (_replace_number, _drop_number, _insert_spaces, _change_operator)


def wrong_attempt(hand: Hand, seed: int, index: int, fraction: float, mode: str = "exact"):
    """None (single-turn example) or (wrong response text, its failure reason) (GP §5).

    The RNG's first random() < `fraction` makes the example multi-turn; randrange(4) then
    picks the first corruption kind to try. A corruption that still scores >= 5 (e.g. an
    operator change from `*1` to `/1`) passes to the next kind, cyclically; replacing a
    number always scores < 5, so some kind always succeeds.
    """
    rng = hand_rng("generalpoints-sft-wrong", hand.split, seed, index)
    if not rng.random() < fraction:
        return None
    if hand.reference is None:
        raise ValueError(f"hand {list(hand.cards)} ({hand.split}) has no reference answer to corrupt")
    tokens = _TOKEN.findall(hand.reference)
    first = rng.randrange(len(CORRUPTIONS))
    for step in range(len(CORRUPTIONS)):
        corrupt = CORRUPTIONS[(first + step) % len(CORRUPTIONS)]
        formula = "".join(corrupt(tokens, hand, rng))
        text = answer_block(hand.cards, hand.numbers, f"{formula}={TARGET}")
        result = score(text, hand, mode)
        if result.reward < 5:
            return text, result.reason
    raise AssertionError("unreachable: a replaced number always scores below 5")
