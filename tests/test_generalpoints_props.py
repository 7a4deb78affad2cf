"""Property tests of the verifier (GP §6, §7): it never raises, never runs text, and its
two arithmetic modes agree with Python's eval on formulas these tests build themselves.

Only this test file calls eval, and only on strings it generated from digits, operators
and parentheses; the package never does (GP §7).
"""

import random
import re
from fractions import Fraction

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tasks.generalpoints import OUTCOMES, deal, evaluate, make_hand, outcome_of, score
from tasks.generalpoints.prompt import answer_block

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
H1 = make_hand(["4", "6", "A", "A"], "id")
REACHABLE = {5.0, 1.0, 0.0, -1.0, -2.0, -3.0} | {float(-n) for n in range(4, 10_000)}

formula_chars = st.text(alphabet="0123456789+-*/()=٤４ .x", max_size=60)
adversarial = st.one_of(
    st.text(),
    formula_chars,
    st.builds(lambda f: answer_block(H1.cards, H1.numbers, f), formula_chars),
    st.builds(lambda f: '{"formula": "' + f + '"}', formula_chars),
    st.builds(lambda n, f: "(" * n + f + ")" * n, st.integers(0, 3000), formula_chars),
    st.builds(lambda n: "9" * n, st.integers(4000, 6000)),
)


@SETTINGS
@given(adversarial, st.sampled_from(["exact", "reference"]), st.integers(0, 50))
def test_score_never_raises(text, mode, index):
    hand = deal("ood" if index % 2 else "id", 11, index)
    result = score(text, hand, mode)
    assert result.reward in REACHABLE and result.outcome in OUTCOMES
    assert result.outcome == outcome_of(result.reward)
    assert result.reason.endswith(".")


def _numbers():
    # Mostly card values; sometimes literals Python treats specially: `08`, `013`
    # (rejected), `0` and `00` (zero, so division by zero).
    special = ["08", "013", "0", "00"]
    return st.integers(0, 39).map(lambda i: special[i - 36] if i >= 36 else str(i % 13 + 1))


def _expressions():
    def combine(children):
        binary = st.tuples(children, st.sampled_from("+-*/"), children).map("".join)
        return st.one_of(binary, binary, children.map(lambda e: f"({e})"))

    return st.recursive(_numbers(), combine, max_leaves=8)


# A formula built from whole expressions, sometimes cut short: cutting a well-formed
# formula never breaks the grammar scan, so every evaluation failure case shows up
# (unclosed parentheses, trailing operators, empty text) next to division by zero.
formulas = st.builds(lambda e, cut: e[: max(0, len(e) - cut)], _expressions(), st.integers(-6, 3))


def _python(text, exact):
    if exact:  # the same formula over Fractions: exact rational arithmetic by Python
        text = re.sub(r"\d+", lambda m: f"Fraction({m.group()})", text)
    try:
        return ("ok", eval(text, {"Fraction": Fraction}))  # noqa: S307  (test-generated text only)
    except (SyntaxError, ZeroDivisionError, OverflowError):
        return ("fail", None)


@settings(SETTINGS, max_examples=1000)
@given(formulas)
def test_reference_mode_is_python_eval(text):
    ours = evaluate(text, "reference")
    status, theirs = _python(text, exact=False)
    event(f"{status} {type(theirs).__name__}")
    if status == "fail":
        assert ours is None
    else:
        assert type(ours) is type(theirs) and ours == theirs


@settings(SETTINGS, max_examples=1000)
@given(formulas)
def test_exact_mode_is_rational_arithmetic(text):
    ours = evaluate(text, "exact")
    status, theirs = _python(text, exact=True)
    if status == "fail":
        assert ours is None
    else:
        assert isinstance(ours, Fraction) and ours == theirs


@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from(["id", "ood"]), st.data())
def test_reference_reward_follows_python_on_hand_formulas(index, split, data):
    """On formulas over exactly the hand's numbers, +5 in reference mode iff eval gives 24."""
    hand = deal(split, 99, index)
    numbers = list(hand.numbers)
    order = data.draw(st.permutations(numbers))
    ops = data.draw(st.lists(st.sampled_from("+-*/"), min_size=3, max_size=3))
    text = str(order[0])
    for op, n in zip(ops, order[1:]):
        text = f"({text}{op}{n})" if data.draw(st.booleans()) else f"{text}{op}{n}"
    status, value = _python(text, exact=False)
    expected_correct = status == "ok" and value == 24
    result = score(answer_block(hand.cards, hand.numbers, text), hand, "reference")
    assert (result.reward == 5) == expected_correct


def _random_formula(rng):
    """Four card values, random operators, a random bracketing (or a broken one)."""
    text = str(rng.randint(1, 13))
    for _ in range(3):
        op, n = rng.choice("+-*/"), rng.randint(1, 13)
        text = rng.choice([f"{text}{op}{n}", f"({text}){op}{n}", f"{n}{op}({text})", f"({text}{op}{n})"])
    return text[: rng.randint(len(text) - 2, len(text))]  # a third of them cut short


def test_reference_mode_matches_eval_on_20000_random_formulas():
    rng = random.Random(7)
    kinds = {"int": 0, "float": 0, "fail": 0}
    for _ in range(20_000):
        text = _random_formula(rng)
        ours = evaluate(text, "reference")
        status, theirs = _python(text, exact=False)
        assert (ours is None) if status == "fail" else (type(ours) is type(theirs) and ours == theirs), text
        kinds["fail" if status == "fail" else type(theirs).__name__] += 1
    assert min(kinds.values()) > 2000
