"""Prompt, reference answer and failure message: exact benchmark text (GP §4, §5, §8)."""

from __future__ import annotations

from tasks.generalpoints.cards import Hand

TARGET = 24
FACE = {
    "id": "'J', 'Q', and 'K' count as '10'.",
    "ood": "'J', 'Q', and 'K' count as '11', '12', and '13' respectively.",
}

# The period-comma `.,` after the face sentence and the single-quoted formula placeholder
# are the authors' text, kept byte for byte.
_PROMPT_LINES = (
    "[Task Description]",
    "You are an expert {target} points card game player. You will receive a set of 4 cards.",
    "Note that {face}, and each card must be used once.",
    "Your goal is to output a formula that evaluates to {target} using numbers from the cards"
    " and operators such as '+', '-', '*', '/', '(', ')', and '='.",
    "",
    "[Input]",
    "Cards: {cards}",
    "",
    "[Output]",
    "{{",
    '  "cards": [x, y, z, w], where {face},',
    '  "number": [a, b, c, d], where a, b, c, and d are the numbers on the cards,',
    "  \"formula\": 'an equation that equals {target}',",
    "}}",
)
_PROMPT = "\n" + "\n".join(_PROMPT_LINES) + "\n\n"


def card_list(cards) -> str:
    """Display strings as Python's list repr: `['Q', '2', 'A', 'A']` (GP §4)."""
    return "[" + ", ".join(f"'{card}'" for card in cards) + "]"


def render_prompt(hand: Hand) -> str:
    """The benchmark prompt: starts with a newline, ends with `}` and two newlines (GP §4)."""
    return _PROMPT.format(target=TARGET, face=FACE[hand.split], cards=card_list(hand.cards))


def answer_block(cards, numbers, formula: str) -> str:
    """The answer block with a given formula text (GP §5); the formula is written as is."""
    return "\n".join(
        (
            "{",
            f'  "cards": {card_list(cards)},',
            f'  "number": [{", ".join(str(n) for n in numbers)}],',
            f'  "formula": "{formula}",',
            "}",
        )
    )


def reference_answer(hand: Hand) -> str:
    """The SFT target of a hand: its reference solution followed by `=24` (GP §5)."""
    if hand.reference is None:
        raise ValueError(f"hand {list(hand.cards)} ({hand.split}) has no solution, hence no reference answer")
    return answer_block(hand.cards, hand.numbers, f"{hand.reference}={TARGET}")


def failure_message(reason: str) -> str:
    """The user turn after a failed attempt (GP §8): one space, then the reason text."""
    return f"You failed this trial because {reason}"
