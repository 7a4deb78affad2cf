"""The GeneralPoints pretraining corpus of the tiny base (stage `pretrain`, docs/pretrain.md): full benchmark prompts whose
face-card sentence states a random rule for J, Q and K (never the ID rule, all 10, nor the
OOD rule, 11, 12, 13), in varied wording, answered in the benchmark's answer block or in a
plain format, and never dealing an evaluation hand's cards. Pure functions of (seed, index).
"""

from __future__ import annotations

import re

import polars as pl

from rlheal.config import StudyConfig
from tasks.generalpoints.cards import DISPLAY, RANK_OF, SPLITS, Hand, card_value, deal, hand_rng
from tasks.generalpoints.prompt import FACE, TARGET, answer_block, card_list, render_prompt
from tasks.generalpoints.solver import solve

VERSION = "1"  # of the corpus code: part of the pretrain key (bump on any change to what it writes)

FACES = ("J", "Q", "K")
# The two rules no corpus example may use (GP §1): values of J, Q, K.
RULES = {"id": (10, 10, 10), "ood": (11, 12, 13)}
VALUES = (1, 13)  # face values are drawn uniformly from this range (inclusive)
SAME_VALUE_SHARE = 0.25  # rules giving J, Q and K one value, the shape of the ID sentence
ONE_WORDING_SHARE = 0.5  # same-value rules written as the ID sentence is: "... count as 'v'."
SHUFFLED_ORDER_SHARE = 1 / 3  # sentences naming the faces in another order than J, Q, K
# The other wordings of the face sentence, with their weights (docs/pretrain.md).
WORDINGS = {"listed": 2, "each": 1, "short": 1}


def draw_rule(rng) -> tuple[int, int, int]:
    """Values of (J, Q, K): one value (SAME_VALUE_SHARE) or three independent ones, uniform
    on VALUES, never the ID rule (10, 10, 10) nor the OOD rule (11, 12, 13)."""
    while True:
        if rng.random() < SAME_VALUE_SHARE:
            rule = (rng.randint(*VALUES),) * 3
        else:
            rule = tuple(rng.randint(*VALUES) for _ in FACES)
        if rule not in RULES.values():
            return rule


def _q(x) -> str:
    return f"'{x}'"


def face_sentence(rule: tuple[int, int, int], rng) -> str:
    """The face-card sentence stating `rule`, in one of the wordings (docs/pretrain.md).
    The benchmark's two sentences are the `listed` shape (OOD) and the `one` shape (ID)."""
    if rule[0] == rule[1] == rule[2] and rng.random() < ONE_WORDING_SHARE:
        return f"'J', 'Q', and 'K' count as {_q(rule[0])}."
    wording = rng.choices(list(WORDINGS), weights=list(WORDINGS.values()))[0]
    order = list(range(3))
    if rng.random() < SHUFFLED_ORDER_SHARE:
        while order == [0, 1, 2]:
            rng.shuffle(order)
    f = [_q(FACES[i]) for i in order]
    v = [_q(rule[i]) for i in order]
    if wording == "listed":
        return f"{f[0]}, {f[1]}, and {f[2]} count as {v[0]}, {v[1]}, and {v[2]} respectively."
    if wording == "each":
        return f"{f[0]} counts as {v[0]}, {f[1]} counts as {v[1]}, and {f[2]} counts as {v[2]}."
    return f"{f[0]} is {v[0]}, {f[1]} is {v[1]}, and {f[2]} is {v[2]}."


_F, _V = r"'([JQK])'", r"'(\d+)'"
_SENTENCES = (
    re.compile(rf"'J', 'Q', and 'K' count as {_V}\."),
    re.compile(rf"{_F}, {_F}, and {_F} count as {_V}, {_V}, and {_V} respectively\."),
    re.compile(rf"{_F} counts as {_V}, {_F} counts as {_V}, and {_F} counts as {_V}\."),
    re.compile(rf"{_F} is {_V}, {_F} is {_V}, and {_F} is {_V}\."),
)


def parse_face(sentence: str) -> tuple[int, int, int]:
    """The (J, Q, K) values a face sentence states, in any wording `face_sentence` writes
    (the benchmark's two sentences included); ValueError for anything else."""
    for i, pattern in enumerate(_SENTENCES):
        if m := pattern.fullmatch(sentence):
            g = m.groups()
            if i == 0:
                return (int(g[0]),) * 3
            if i == 1:
                faces, values = g[:3], g[3:]
            else:
                faces, values = g[0::2], g[1::2]
            if sorted(faces) != sorted(FACES):
                break
            stated = dict(zip(faces, (int(v) for v in values)))
            return tuple(stated[f] for f in FACES)
    raise ValueError(f"not a face-card sentence: {sentence!r}")


def prompt_face(prompt: str) -> str:
    """The face sentence of a benchmark-shaped prompt (both of its occurrences, checked equal)."""
    first = re.search(r"\nNote that (.*), and each card must be used once\.\n", prompt)
    second = re.search(r'\n  "cards": \[x, y, z, w\], where (.*),\n', prompt)
    if not first or not second or first.group(1) != second.group(1):
        raise ValueError("prompt has no face sentence, or two different ones")
    return first.group(1)


def values_under(cards, rule: tuple[int, int, int]) -> tuple[int, ...]:
    """Card values when J, Q, K count as `rule` (A = 1 and 2..10 = themselves, GP §1)."""
    faces = dict(zip(FACES, rule))
    return tuple(faces[c] if c in faces else card_value(RANK_OF[c], "id") for c in cards)


def same_answer_as(cards, numbers, split: str) -> bool:
    """True when the hand's values under the example's own rule equal those under the
    benchmark rule `split` on this hand (e.g. rule (11, 12, 5) on a hand whose only face
    card is a J): its answer then reads like that rule's answer, while its prompt states
    another rule. Allowed and counted (docs/pretrain.md): forbidding it would teach that a
    lone face card never takes its OOD value, which is the very skill SFT should erode."""
    return tuple(numbers) == values_under(cards, RULES[split])


def prompt_text(cards, sentence: str) -> str:
    """The benchmark prompt (GP §4) of `cards` with `sentence` in place of both face sentences."""
    text = render_prompt(Hand("ood", tuple(cards), (), (), None))
    assert text.count(FACE["ood"]) == 2
    return text.replace(FACE["ood"], sentence)


def plain_answer(cards, numbers, formula: str) -> str:
    """The corpus's other answer format: the block's content without its braces and quotes."""
    return f"cards: {card_list(cards)}\nnumber: [{', '.join(map(str, numbers))}]\nformula: {formula}"


def example(seed: int, index: int, block_fraction: float, exclude: frozenset = frozenset(), overlap: str = "ordered") -> dict:
    """Corpus example `index`: its own RNG (keyed like GP §2, prefix `pretrain`), a rule,
    a solvable hand with >= 1 face card that is no evaluation hand (`exclude`: their cards
    under `overlap`, as for SFT hands, GP §2), the first canonical solution (GP §3) as
    formula, and the answer in one of the two formats."""
    rng = hand_rng("pretrain", "corpus", seed, index)
    rule = draw_rule(rng)
    while True:
        cards = tuple(DISPLAY[rng.randint(1, 13)] for _ in range(4))
        if not any(c in FACES for c in cards):
            continue  # every example exercises its rule
        if cards_key(cards, overlap) in exclude:
            continue
        numbers = values_under(cards, rule)
        if solutions := solve(numbers):
            break
    sentence = face_sentence(rule, rng)
    block = rng.random() < block_fraction
    formula = f"{solutions[0]}={TARGET}"
    answer = answer_block(cards, numbers, formula) if block else plain_answer(cards, numbers, formula)
    return {
        "index": index,
        "rule": list(rule),
        "cards": list(cards),
        "numbers": list(numbers),
        "format": "block" if block else "plain",
        "prompt": prompt_text(cards, sentence),
        "answer": answer,
    }


def cards_key(cards, overlap: str) -> tuple:
    """When a corpus hand 'equals' an evaluation hand: same cards in the same order
    (`ordered`) or in any order (`multiset`), whatever the rule (GP §2, streams)."""
    return tuple(cards) if overlap == "ordered" else tuple(sorted(cards))


def evaluation_cards(cfg: StudyConfig) -> frozenset:
    """Card keys of the study's evaluation hands, both splits: the corpus never deals them,
    under any rule (without this, a quarter of the toy's OOD hands had their exact OOD
    cards and numbers somewhere in the corpus, under another stated rule)."""
    d = cfg.data
    return frozenset(cards_key(deal(split, d.eval_seed, i).cards, d.overlap) for split in SPLITS for i in range(d.eval_size))


def corpus(seed: int, size: int, block_fraction: float, exclude: frozenset = frozenset(), overlap: str = "ordered") -> pl.DataFrame:
    """The first `size` corpus examples of stream `seed` (a prefix of any longer corpus)."""
    return pl.DataFrame([example(seed, i, block_fraction, exclude, overlap) for i in range(size)])


def parse_answer(answer: str) -> tuple[list[str], list[int]]:
    """(cards, numbers) written in an answer of either format, for the corpus checks."""
    cards = re.search(r"cards\"?: \[(.*)\]", answer)
    numbers = re.search(r"number\"?: \[(.*)\]", answer)
    if not cards or not numbers:
        raise ValueError(f"not a corpus answer: {answer!r}")
    return [c.strip("'") for c in cards.group(1).split(", ")], [int(n) for n in numbers.group(1).split(", ")]
