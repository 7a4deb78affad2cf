"""Cards, the two value rules and dealing (GP §1, §2).

A hand is four ranks 1..13 drawn with replacement. What the model sees are display
strings (`A`, `2`..`10`, `J`, `Q`, `K`); what the verifier checks are the values under the
hand's split: `id` counts J, Q, K as 10, `ood` as 11, 12, 13.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

from tasks.generalpoints.solver import solve

SPLITS = ("id", "ood")
OVERLAPS = ("ordered", "multiset")
DISPLAY = {1: "A", **{r: str(r) for r in range(2, 11)}, 11: "J", 12: "Q", 13: "K"}
RANK_OF = {name: rank for rank, name in DISPLAY.items()}


@dataclasses.dataclass(frozen=True, slots=True)
class Hand:
    """One dealt hand. `cards` and `numbers` are tuples (hashable, immutable); compare them
    with lists through `list(hand.cards)`. `seed`/`index` are None for `make_hand` hands."""

    split: str
    cards: tuple[str, ...]
    numbers: tuple[int, ...]
    solutions: tuple[str, ...]
    reference: str | None
    seed: int | None = None
    index: int | None = None


def card_value(rank: int, split: str) -> int:
    """Value of a rank under a split's rule (GP §1): faces are 10 in `id`, 11..13 in `ood`."""
    return min(rank, 10) if split == "id" else rank


def hand_rng(prefix: str, split: str, seed: int, index: int) -> random.Random:
    """A private Mersenne Twister per (split, seed, index) (GP §2, step 1).

    Never the global RNG: the authors' hands depended on call history because their
    solver's shuffles consumed the same global generator.
    """
    digest = hashlib.sha256(f"{prefix}:{split}:{seed}:{index}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def deal(split: str, seed: int, index: int) -> Hand:
    """Deal hand `index` of stream `seed` under `split`, rejecting unsolvable draws (GP §2)."""
    _check_split(split)
    rng = hand_rng("generalpoints", split, seed, index)
    while True:
        if split == "id":
            ranks = [rng.randint(1, 13) for _ in range(4)]
        else:
            # Every OOD hand holds at least one face card, at a random position.
            ranks = [rng.randint(1, 13) for _ in range(3)] + [rng.randint(11, 13)]
            rng.shuffle(ranks)
        numbers = tuple(card_value(r, split) for r in ranks)
        solutions = tuple(solve(numbers))
        if solutions:
            break
    reference = solutions[rng.randrange(len(solutions))]
    cards = tuple(DISPLAY[r] for r in ranks)
    return Hand(split, cards, numbers, solutions, reference, seed, index)


def make_hand(cards, split: str) -> Hand:
    """A Hand from four display strings (GP §2); unsolvable hands are accepted, with
    `reference` None; otherwise the reference is the first canonical solution."""
    _check_split(split)
    cards = tuple(cards)
    unknown = [c for c in cards if c not in RANK_OF]
    if len(cards) != 4 or unknown:
        raise ValueError(
            f"make_hand needs 4 cards among {list(RANK_OF)}; got {list(cards)!r}"
            + (f" (unknown: {unknown!r})" if unknown else "")
        )
    numbers = tuple(card_value(RANK_OF[c], split) for c in cards)
    solutions = tuple(solve(numbers))
    return Hand(split, cards, numbers, solutions, solutions[0] if solutions else None)


def overlap_key(hand: Hand, overlap: str = "ordered") -> tuple:
    """Key under which a training hand 'equals' an evaluation hand (GP §2, streams):
    `ordered` = same split and cards in the same order (the identical prompt),
    `multiset` = same split and the same cards in any order."""
    if overlap == "ordered":
        return (hand.split, tuple(hand.cards))
    if overlap == "multiset":
        return (hand.split, tuple(sorted(hand.cards)))
    raise ValueError(f"overlap must be one of {OVERLAPS}; got {overlap!r}")


hand_key = overlap_key


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
