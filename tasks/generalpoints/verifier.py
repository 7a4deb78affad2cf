"""Formula extraction and the reward function (GP §6, §7).

Model output is never handed to `eval`, `exec`, `compile` or `ast`: formulas are checked
and evaluated by the tokenizer and iterative parser below, so no text can run code, and
`score` returns a Score for every str, however long or deeply nested.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import re
import unicodedata
from collections import Counter
from fractions import Fraction
from functools import lru_cache

from tasks.generalpoints.cards import Hand
from tasks.generalpoints.metrics import outcome_of
from tasks.generalpoints.solver import TARGET, solve_multiset

MODES = ("exact", "reference")

_FORMULA = re.compile(r'"formula": "(.*?)"')
# `\d` on str patterns = Unicode category Nd, as in the authors' regex (GP §7.1 rule 1).
_LEGAL = re.compile(r"[\d+\-*/()]*")
_TOKEN = re.compile(r"\d+|[+\-*/()]")
_DIGITS = re.compile(r"\d+")
_OPERATORS = "+-*/"
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}

# Python refuses more than 200 open parentheses and integer literals of more than 4,300
# digits; `reference` mode reproduces eval, and both modes share its failure cases.
MAX_OPEN_PARENTHESES = 200
MAX_LITERAL_DIGITS = 4300


@dataclasses.dataclass(frozen=True, slots=True)
class Score:
    """One graded response (GP §7.2). `truncated` marks the ungraded RL step (GP §8)."""

    reward: float
    outcome: str
    reason: str
    formula: str
    extracted: bool
    format_error: bool
    mode: str
    truncated: bool = False


# ------------------------------------------------------------------------- extraction


def extract_formula(response: str) -> tuple[str, bool]:
    """(formula text before the first `=`, extracted) from a raw response (GP §6)."""
    text = _json_formula(response)
    if text is None:
        match = _FORMULA.search(response)
        text = match.group(1) if match else None
    if text is None:
        return "None", False
    return text.split("=", 1)[0], True


def _json_formula(response: str) -> str | None:
    """Step 1 of GP §6: the `formula` value of a response that is one JSON object."""
    # An object document starts with `{` and ends with `}` around JSON whitespace; skipping
    # json.loads on anything else saves its exception on most responses.
    stripped = response.strip(" \t\n\r")
    if not (stripped.startswith("{") and stripped.endswith("}")):
        return None
    try:
        document = json.loads(response)
    except (ValueError, RecursionError):  # not JSON, over-long integers, deep nesting
        return None
    if not isinstance(document, dict) or "formula" not in document:
        return None
    value = document["formula"]
    if isinstance(value, str):
        return value
    # DECISION (GP §6): a non-string value is read as its Python str(); the authors' code
    # crashed here. A value too deeply nested to print falls through to the regex.
    try:
        return str(value)
    except (ValueError, RecursionError):
        return None


# ---------------------------------------------------------------------------- scoring


def score(response: str, hand: Hand, mode: str = "exact") -> Score:
    """Grade one response for one hand under `mode` (`exact` or `reference`) (GP §7.1)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    formula, extracted = extract_formula(response)

    def result(reward, messages, format_error=False):
        reason = ", ".join(messages) + "."
        return Score(float(reward), outcome_of(reward), reason, formula, extracted, format_error, mode)

    # Rule 1: only digit runs and + - * / ( ) (a failed extraction, `None`, fails here).
    if not _LEGAL.fullmatch(formula):
        return result(-3, ["illegal characters"], format_error=True)
    tokens = _TOKEN.findall(formula)

    # Rules 2-4: grammar (-3 each) and number (-2 each) penalties accumulate.
    grammar = _grammar_messages(tokens)
    numbers = _number_messages(formula, hand.numbers)
    if grammar or numbers:
        return result(-3 * len(grammar) - 2 * len(numbers), grammar + numbers)

    value = _evaluate(tokens, mode)
    if value is not None and value == TARGET:
        return result(5, ["Correct solution"])
    prefixes = _solution_prefixes(tuple(sorted(hand.numbers)))
    if value is None and formula in prefixes:
        return result(1, ["partial solution"])

    # Rule 5: the longest token-boundary prefix of f that starts some solver string.
    prefix = ""
    for token in tokens:
        grown = prefix + token
        if grown not in prefixes:
            if not prefix:
                return result(-1, ["your formula does not match any solution"])
            return result(-1, [f"{prefix} is partially correct but the full formula does not match any solution"])
        prefix = grown
    return result(0, [])


@lru_cache(maxsize=None)
def _solution_prefixes(sorted_numbers: tuple) -> frozenset[str]:
    """Every non-empty prefix of every solver string of a multiset: the authors'
    `any(sol.startswith(p) for sol in solutions)` becomes one set lookup."""
    return frozenset(s[:i] for s in solve_multiset(sorted_numbers) for i in range(1, len(s) + 1))


def _grammar_messages(tokens: list[str]) -> list[str]:
    """Rule 2 of GP §7.1: one message per violation, in formula order."""
    messages = []
    previous = None  # "number", "operator", "(" or ")"
    open_count = 0
    for token in tokens:
        if token in _OPERATORS:
            kind = "operator"
            if previous not in ("number", ")"):
                messages.append("invalid sequence after operator")
        elif token == "(":
            kind = "("
            if previous in (None, "operator", "("):
                open_count += 1
            else:
                messages.append("invalid sequence before '('")
        elif token == ")":
            kind = ")"
            if previous not in ("number", ")"):
                messages.append("invalid sequence after ')'")
            elif open_count:
                open_count -= 1
            else:
                messages.append("unmatched closing parenthesis")
        else:
            kind = "number"
            if previous not in (None, "operator", "("):
                messages.append("invalid sequence after number")
        previous = kind
    return messages


def _number_messages(formula: str, hand_numbers) -> list[str]:
    """Rule 3 of GP §7.1. Values are compared as canonical decimal strings, so digit runs
    of any length work without Python's 4,300-digit int() limit."""
    runs = _DIGITS.findall(formula)
    if sorted(runs) == _sorted_decimals(tuple(hand_numbers)):
        return []  # the usual case; raw runs equal to canonical strings need no conversion
    used = Counter(_decimal(t) for t in runs)
    held = Counter(str(n) for n in hand_numbers)
    messages = []
    invalid = [v for v in used if v not in held]  # Counter keeps first-appearance order
    overused = [v for v in used if used[v] > held[v]]
    if invalid:
        messages.append(f"you used invalid numbers: {_int_list(invalid)}")
    elif overused:
        messages.append(f"you used numbers: {_int_list(overused)} too many times")
    underused = [v for v in held if held[v] > used[v]]
    if underused:
        messages.append(f"you didn't use numbers: {_int_list(underused)}")
    return messages


@lru_cache(maxsize=4096)
def _sorted_decimals(numbers: tuple) -> list[str]:
    # A list so that it compares equal to sorted(...) directly; callers never mutate it.
    return sorted(str(n) for n in numbers)


def _decimal(token: str) -> str:
    """Integer value of a digit run as ASCII without leading zeros (`08` -> `8`, `٤` -> `4`)."""
    if not token.isascii():
        token = "".join(str(unicodedata.decimal(ch)) for ch in token)
    return token.lstrip("0") or "0"


def _int_list(values: list[str]) -> str:
    """Python's repr of the int list, from canonical decimal strings: `[4, 6, 1]`."""
    return "[" + ", ".join(values) + "]"


# ------------------------------------------------------------------------- evaluation


def evaluate(formula: str, mode: str = "exact"):
    """Value of a formula under GP §7.3 (Fraction in `exact`, int or float in `reference`),
    or None when evaluation fails (illegal characters included)."""
    if not _LEGAL.fullmatch(formula):
        return None
    value = _evaluate(_TOKEN.findall(formula), mode)
    return Fraction(value) if mode == "exact" and value is not None else value


def _evaluate(tokens: list[str], mode: str):
    """Operator-precedence parse with explicit stacks, so nesting costs no recursion.

    `reference` mode is Python's own arithmetic on Python's own types: int literals,
    `+ - *` stay exact on ints, `/` is true division (a correctly rounded double), and any
    double operand makes the operation a double operation. That is what eval computed.
    """
    divide = _exact_divide if mode == "exact" else operator.truediv
    values: list = []
    pending: list[str] = []  # operators and "(" not yet applied
    expect_operand = True
    depth = 0
    try:
        for token in tokens:
            if token == "(":
                depth += 1
                if not expect_operand or depth > MAX_OPEN_PARENTHESES:
                    return None
                pending.append(token)
            elif token == ")":
                if expect_operand or depth == 0:
                    return None
                while pending[-1] != "(":
                    _apply(values, pending.pop(), divide)
                pending.pop()
                depth -= 1
            elif token in _PRECEDENCE:
                if expect_operand:
                    return None
                while pending and pending[-1] != "(" and _PRECEDENCE[pending[-1]] >= _PRECEDENCE[token]:
                    _apply(values, pending.pop(), divide)
                pending.append(token)
                expect_operand = True
            else:
                value = _CARD_LITERALS.get(token)
                if value is None:
                    value = _literal(token)
                if not expect_operand or value is None:
                    return None
                values.append(value)
                expect_operand = False
        if expect_operand or depth:  # trailing operator, empty formula, unclosed "("
            return None
        while pending:
            _apply(values, pending.pop(), divide)
    except (ZeroDivisionError, OverflowError):  # OverflowError: int too large for a double
        return None
    return values[0]


_CARD_LITERALS = {str(v): v for v in range(1, 14)}  # the common tokens, read without checks


def _literal(token: str) -> int | None:
    """A digit run read as Python reads an integer literal, or None where Python rejects
    it: non-ASCII digits, a leading zero (`08`; all zeros such as `00` is 0), or more
    than 4,300 digits."""
    if not token.isascii():
        return None
    significant = token.lstrip("0")
    if not significant:
        return 0
    if len(significant) != len(token) or len(token) > MAX_LITERAL_DIGITS:
        return None
    return int(token)


_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _apply(values: list, op: str, divide) -> None:
    right = values.pop()
    left = values.pop()
    values.append(divide(left, right) if op == "/" else _ARITHMETIC[op](left, right))


def _exact_divide(left, right):
    # `exact` keeps ints while it can (+ - * of ints are exact) and turns to Fractions at
    # the first division: the same rational value as Fractions throughout, faster.
    if type(left) is int and type(right) is int:
        return Fraction(left, right)  # raises ZeroDivisionError on 0, like the others
    return left / right
