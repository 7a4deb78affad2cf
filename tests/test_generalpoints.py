"""GeneralPoints: every test vector of the spec (generalpoints.md, "GP"), exhaustively
where that is cheap, plus the episode, metrics and multi-turn SFT helpers."""

import dataclasses
import hashlib
import itertools
import math
import random

import pytest

from tasks.eval import wilson_interval
from tasks.generalpoints import (
    OUTCOMES,
    SPLITS,
    Episode,
    Score,
    deal,
    evaluate,
    extract_formula,
    failure_message,
    hand_key,
    make_hand,
    outcome_of,
    overlap_key,
    reference_answer,
    render_prompt,
    score,
    solve,
    wrong_attempt,
)
from tasks.generalpoints.prompt import answer_block
from tasks.generalpoints.solver import OPERATORS, PATTERNS

H1 = make_hand(["4", "6", "A", "A"], "id")
H2 = make_hand(["3", "3", "8", "8"], "id")
H3 = make_hand(["J", "2", "A", "A"], "id")
H4 = make_hand(["J", "2", "A", "A"], "ood")
H5 = make_hand(["Q", "2", "A", "A"], "ood")


def R(hand, formula):
    """GP §10's R[f]: the §5 answer block of the hand with formula text f."""
    return answer_block(hand.cards, hand.numbers, formula)


# ------------------------------------------------------------------ cards and dealing (§1, §2)


def test_card_values_under_both_rules():
    assert list(make_hand(["J", "2", "A", "Q"], "id").numbers) == [10, 2, 1, 10]
    assert list(make_hand(["J", "2", "A", "Q"], "ood").numbers) == [11, 2, 1, 12]
    assert list(make_hand(["10", "K", "3", "3"], "id").numbers) == [10, 10, 3, 3]
    assert list(make_hand(["10", "K", "3", "3"], "ood").numbers) == [10, 13, 3, 3]


def test_make_hand_accepts_unsolvable_and_rejects_unknown_cards():
    hand = make_hand(["J", "2", "A", "Q"], "id")
    assert hand.solutions == () and hand.reference is None
    assert make_hand(["J", "2", "A", "A"], "id").reference == solve([10, 2, 1, 1])[0]
    for bad in (["T", "2", "A", "A"], ["1", "2", "A", "A"], ["A", "2", "3"], ["a", "2", "3", "4"]):
        with pytest.raises(ValueError):
            make_hand(bad, "id")
    with pytest.raises(ValueError):
        make_hand(["A", "2", "3", "4"], "test")


def test_deal_key_and_hand_vectors():
    digest = hashlib.sha256(b"generalpoints:id:42:0").digest()
    assert int.from_bytes(digest[:8], "big") == 18367742321295936902
    hand = deal("id", 42, 0)
    assert list(hand.cards) == ["3", "6", "2", "6"]
    assert len(hand.solutions) == 87 and hand.reference == "6*(2*6/3)"
    hand = deal("id", 42, 1)
    assert list(hand.cards) == ["3", "2", "7", "8"] and hand.reference == "(8/3)*(7+2)"
    hand = deal("ood", 42, 7)
    assert list(hand.cards) == ["2", "A", "Q", "K"] and list(hand.numbers) == [2, 1, 12, 13]
    assert len(hand.solutions) == 127 and hand.reference == "(13+1+12)-2"
    assert (hand.split, hand.seed, hand.index) == ("ood", 42, 7)


def test_dealing_is_deterministic_and_always_solvable():
    for split in SPLITS:
        first = [deal(split, 5, i) for i in range(300)]
        assert first == [deal(split, 5, i) for i in range(300)]
        assert all(h.solutions and h.reference in h.solutions for h in first)
        assert all(list(h.solutions) == solve(h.numbers) for h in first)
    assert all(set(deal("ood", 5, i).cards) & {"J", "Q", "K"} for i in range(300))
    assert deal("id", 5, 0) != deal("id", 6, 0)


def test_overlap_keys():
    a, b = make_hand(["3", "8", "3", "8"], "id"), make_hand(["8", "8", "3", "3"], "id")
    assert overlap_key(a, "ordered") != overlap_key(b, "ordered")
    assert overlap_key(a, "multiset") == overlap_key(b, "multiset")
    assert overlap_key(a) == ("id", ("3", "8", "3", "8")) == hand_key(a)
    assert overlap_key(a, "multiset") != overlap_key(make_hand(["8", "8", "3", "3"], "ood"), "multiset")
    with pytest.raises(ValueError):
        overlap_key(a, "sorted")


def test_hand_is_a_frozen_dataclass():
    hand = deal("id", 42, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hand.split = "ood"
    assert dataclasses.replace(hand, reference=hand.solutions[0]).reference == hand.solutions[0]
    assert hash(hand) == hash(deal("id", 42, 0))


# ---------------------------------------------------------------------------- solver (§3)


def test_solver_examples():
    assert solve([3, 3, 8, 8]) == ["8/(3-8/3)"]
    assert len(solve([4, 6, 1, 1])) == 306
    assert len(solve([10, 2, 1, 1])) == 10
    assert "(10+2)*(1+1)" in solve([10, 2, 1, 1])
    assert solve([1, 1, 1, 1]) == []
    assert solve([8, 3, 8, 3]) == solve([3, 3, 8, 8])  # only the multiset matters


def _brute_force(values):
    """The spec's definition read literally: every candidate string in canonical order,
    kept when the verifier's exact evaluation (an independent code path) gives 24."""
    found = []
    for a, b, c, d in sorted(set(itertools.permutations(values))):
        for o1, o2, o3 in itertools.product(OPERATORS, repeat=3):
            for pattern in PATTERNS:
                text = pattern.format(a=a, b=b, c=c, d=d, o1=o1, o2=o2, o3=o3)
                if evaluate(text, "exact") == 24:
                    found.append(text)
    return found


def test_solver_matches_brute_force_definition():
    rng = random.Random(0)
    sample = [(3, 3, 8, 8), (1, 4, 6, 1), (10, 2, 1, 1), (1, 5, 5, 5), (13, 7, 3, 11), (12, 12, 12, 12)]
    sample += [tuple(rng.randint(1, 13) for _ in range(4)) for _ in range(4)]
    for values in sample:
        assert solve(values) == _brute_force(values), values


def test_solver_non_card_values_use_exact_arithmetic():
    # Outside 0..13 the float screen is not proven exact, so Fractions are used instead.
    assert solve([48, 2, 1, 1]) == _brute_force((48, 2, 1, 1))
    assert "100/4-1*1" in solve([100, 4, 1, 1])


def test_exhaustive_sanity_figures():
    """GP §2: exact enumeration of all ordered draws, through the memoised solver."""
    id_sizes = [len(solve([min(r, 10) for r in ranks])) for ranks in itertools.product(range(1, 14), repeat=4)]
    ood_sizes = [
        len(solve(ranks)) for ranks in itertools.product(range(1, 14), range(1, 14), range(1, 14), range(11, 14))
    ]
    for sizes, total, solvable, mean in ((id_sizes, 28561, 20876, 54.3), (ood_sizes, 6591, 4815, 56.2)):
        accepted = [n for n in sizes if n]
        assert (len(sizes), len(accepted)) == (total, solvable)
        assert round(sum(accepted) / len(accepted), 1) == mean


def test_every_solver_string_is_exactly_24():
    strings = {s for m in itertools.combinations_with_replacement(range(1, 14), 4) for s in solve(m)}
    assert all(evaluate(s, "exact") == 24 for s in strings)


def test_float_caveat_figures():
    """GP §3: share of solver strings missing 24 in floating point, of hands with one such
    string, and of hands with no string that passes, over all accepted draws."""
    float_misses = {}  # multiset -> (solver strings, strings whose float value is not 24)
    for multiset in itertools.combinations_with_replacement(range(1, 14), 4):
        strings = solve(multiset)
        float_misses[multiset] = (len(strings), sum(evaluate(s, "reference") != 24 for s in strings))
    id_draws = itertools.product(range(1, 14), repeat=4)
    ood_draws = itertools.product(range(1, 14), range(1, 14), range(1, 14), range(11, 14))
    id_hands = [float_misses[tuple(sorted(min(r, 10) for r in d))] for d in id_draws]
    ood_hands = [float_misses[tuple(sorted(d))] for d in ood_draws]
    for hands, figures in ((id_hands, (0.45, 5.9, 0.03)), (ood_hands, (0.09, 2.5, 0.0))):
        hands = [(n, bad) for n, bad in hands if n]
        strings = 100 * sum(bad for _, bad in hands) / sum(n for n, _ in hands)
        some = 100 * sum(1 for _, bad in hands if bad) / len(hands)
        none_pass = 100 * sum(1 for n, bad in hands if bad == n) / len(hands)
        assert (round(strings, 2), round(some, 1), round(none_pass, 2)) == figures
    assert evaluate("8/(3-8/3)", "reference") == 23.99999999999999


# --------------------------------------------------------------------- prompt and answer (§4, §5)

OOD_PROMPT = """
[Task Description]
You are an expert 24 points card game player. You will receive a set of 4 cards.
Note that 'J', 'Q', and 'K' count as '11', '12', and '13' respectively., and each card must be used once.
Your goal is to output a formula that evaluates to 24 using numbers from the cards and operators such as '+', '-', '*', '/', '(', ')', and '='.

[Input]
Cards: ['Q', '2', 'A', 'A']

[Output]
{
  "cards": [x, y, z, w], where 'J', 'Q', and 'K' count as '11', '12', and '13' respectively.,
  "number": [a, b, c, d], where a, b, c, and d are the numbers on the cards,
  "formula": 'an equation that equals 24',
}

"""


def test_render_prompt_exact_text():
    assert render_prompt(H5) == OOD_PROMPT
    id_prompt = OOD_PROMPT.replace(
        "'J', 'Q', and 'K' count as '11', '12', and '13' respectively.", "'J', 'Q', and 'K' count as '10'."
    ).replace("['Q', '2', 'A', 'A']", "['10', 'K', '3', '3']")
    assert render_prompt(make_hand(["10", "K", "3", "3"], "id")) == id_prompt
    assert id_prompt.count("count as '10'.,") == 2
    assert render_prompt(H5).startswith("\n[Task") and render_prompt(H5).endswith("}\n\n")


def test_reference_answer_exact_text():
    hand = dataclasses.replace(H3, reference="(10+2)*(1+1)")
    assert reference_answer(hand) == (
        "{\n"
        "  \"cards\": ['J', '2', 'A', 'A'],\n"
        '  "number": [10, 2, 1, 1],\n'
        '  "formula": "(10+2)*(1+1)=24",\n'
        "}"
    )
    assert score(reference_answer(hand), hand).reward == 5
    with pytest.raises(ValueError):
        reference_answer(make_hand(["J", "2", "A", "Q"], "id"))


def test_reference_answers_of_dealt_hands_score_five_in_exact_mode():
    for split in SPLITS:
        for i in range(200):
            hand = deal(split, 42, i)
            assert score(reference_answer(hand), hand, "exact").reward == 5


# --------------------------------------------------------------------- worked examples (§10)

ROWS = [  # (row, hand, response, (reward exact, reward reference), outcomes, reasons)
    (1, H1, R(H1, "4*6*1*1=24"), 5, "correct", "Correct solution."),
    (2, H1, '{"formula": "4*6*1*1"}', 5, "correct", "Correct solution."),
    (3, H1, '{\n  "formula":"4*6*1*1",\n}', -3, "illegal_formula", "illegal characters."),
    (4, H1, "\"formula\": '4*6*1*1'", -3, "illegal_formula", "illegal characters."),
    (5, H1, 'Sure. "formula": "4*6" then "formula": "4*6*1*1"', -2, "incorrect_number", "you didn't use numbers: [1]."),
    (6, H1, R(H1, "4 * 6 * 1 * 1"), -3, "illegal_formula", "illegal characters."),
    (7, H1, R(H1, "4×6×1×1"), -3, "illegal_formula", "illegal characters."),
    (8, H1, R(H1, "2.4*10"), -3, "illegal_formula", "illegal characters."),
    (9, H1, R(H1, "-1+1+4*6"), -3, "illegal_formula", "invalid sequence after operator."),
    (10, H1, R(H1, "4*6*1"), -2, "incorrect_number", "you didn't use numbers: [1]."),
    (11, H1, R(H1, "4*6*1*1*1"), -2, "incorrect_number", "you used numbers: [1] too many times."),
    (
        12, H1, R(H1, "4**6*1"), -5, "aggregated_error",
        "invalid sequence after operator, you didn't use numbers: [1].",
    ),
    (
        13, H1, R(H1, "(4*6)(1*1)"), -6, "aggregated_error",
        "invalid sequence before '(', unmatched closing parenthesis.",
    ),
    (14, H1, R(H1, "(4*6)1*1"), -3, "illegal_formula", "invalid sequence after number."),
    (15, H1, R(H1, "(4*6)*(1*1"), 1, "partial", "partial solution."),
    (
        16, H1, R(H1, "(4*6*1*1"), -1, "no_solution",
        "(4*6*1 is partially correct but the full formula does not match any solution.",
    ),
    (
        17, H1, R(H1, "4*6/(1-1)"), -1, "no_solution",
        "4*6/(1 is partially correct but the full formula does not match any solution.",
    ),
    (
        18, H1, R(H1, "4*6*1*1+"), -1, "no_solution",
        "4*6*1*1 is partially correct but the full formula does not match any solution.",
    ),
    (
        19, H1, R(H1, "24=4*6*1*1"), -4, "aggregated_error",
        "you used invalid numbers: [24], you didn't use numbers: [4, 6, 1].",
    ),
    (20, H1, R(H1, ""), -2, "incorrect_number", "you didn't use numbers: [4, 6, 1]."),
    (21, H1, R(H1, "((4*6)*1)*1"), 5, "correct", "Correct solution."),
    (22, H1, R(H1, "04*6*1*1"), -1, "no_solution", "your formula does not match any solution."),
    (
        23, H1, '{"formula": 24}', -4, "aggregated_error",
        "you used invalid numbers: [24], you didn't use numbers: [4, 6, 1].",
    ),
    (24, H2, R(H2, "8/(3-8/3)"), (5, 0), ("correct", "aggregated_error"), ("Correct solution.", ".")),
    (
        25, H2, R(H2, "(8/(3-8/3))"), (5, -1), ("correct", "no_solution"),
        ("Correct solution.", "your formula does not match any solution."),
    ),
    (
        26, H2, R(H2, "8/(3-3)*8"), -1, "no_solution",
        "8/(3- is partially correct but the full formula does not match any solution.",
    ),
    (27, H2, R(H2, "3*8+3-8"), -1, "no_solution", "your formula does not match any solution."),
    (28, H2, R(H2, "8*3"), -2, "incorrect_number", "you didn't use numbers: [3, 8]."),
    (
        29, H3, R(H3, "(11+1)*2*1"), -4, "aggregated_error",
        "you used invalid numbers: [11], you didn't use numbers: [10].",
    ),
    (30, H3, R(H3, "(10+2)*(1+1)"), 5, "correct", "Correct solution."),
    (31, H4, R(H4, "(11+1)*2*1"), 5, "correct", "Correct solution."),
    (
        32, H4, R(H4, "(10+2)*(1+1)"), -4, "aggregated_error",
        "you used invalid numbers: [10], you didn't use numbers: [11].",
    ),
    (
        33, H5, R(H5, "(12+2)*(1+1)"), -1, "no_solution",
        "(12+ is partially correct but the full formula does not match any solution.",
    ),
]


def _per_mode(value):
    return value if isinstance(value, tuple) else (value, value)


@pytest.mark.parametrize("row", ROWS, ids=[f"row{r[0]}" for r in ROWS])
def test_worked_example(row):
    _, hand, response, rewards, outcomes, reasons = row
    for mode, reward, outcome, reason in zip(("exact", "reference"), *map(_per_mode, (rewards, outcomes, reasons))):
        result = score(response, hand, mode)
        assert (result.reward, result.outcome, result.reason, result.mode) == (reward, outcome, reason, mode)
        assert isinstance(result.reward, float)
        assert result.format_error == (reason == "illegal characters.")


def test_worked_example_34_rl_truncation_step():
    episode = Episode(H1, rl=True)
    for _ in range(5):
        episode.record(R(H1, "4*6"))
    last = episode.record(R(H1, "4*6*1*1"))  # even a right answer is not graded here
    assert (last.reward, last.outcome, last.reason, last.truncated) == (-1.0, "no_solution", "step_limit_reached", True)


def test_extraction_rules():
    assert extract_formula(R(H1, "(10+2)*(1+1)=24")) == ("(10+2)*(1+1)", True)
    assert extract_formula("```json\n" + R(H1, "4*6*1*1=24") + "\n```") == ("4*6*1*1", True)
    assert extract_formula('{"formula": null}') == ("None", True)
    assert extract_formula('{"formula": true}') == ("True", True)
    assert extract_formula('{"formula": "1", "formula": "2=3"}') == ("2", True)  # last key wins
    assert extract_formula(' {"formula": "=24"} ') == ("", True)
    assert extract_formula('["formula"]') == ("None", False)
    assert extract_formula('"formula": "4*6\n*1*1"') == ("None", False)  # `.` excludes newline
    assert extract_formula("no answer") == ("None", False)
    result = score("no answer", H1)
    assert (result.reward, result.extracted, result.format_error, result.formula) == (-3, False, True, "None")


def test_unicode_digits_count_as_numbers_but_do_not_evaluate():
    result = score(R(H1, "٤*٦*١*١"), H1)  # Arabic-Indic digits: legal characters, right numbers
    assert (result.reward, result.reason) == (-1, "your formula does not match any solution.")
    assert score(R(H1, "４*6*1"), H1).reason == "you didn't use numbers: [1]."
    assert score(R(H1, "٢٤"), H1).reason == "you used invalid numbers: [24], you didn't use numbers: [4, 6, 1]."


def test_nesting_limit_is_pythons():
    ok = "(" * 200 + "4*6*1*1" + ")" * 200
    too_deep = "(" + ok + ")"
    for mode in ("exact", "reference"):
        assert score(R(H1, ok), H1, mode).reward == 5
        assert score(R(H1, too_deep), H1, mode).reason == (
            "( is partially correct but the full formula does not match any solution."
        )


def test_reward_zero_is_reachable_in_reference_mode_only():
    assert score(R(H2, "8/(3-8/3)"), H2, "reference").outcome == "aggregated_error"
    assert score(R(H2, "8/(3-8/3)"), H2, "exact").outcome == "correct"


# ---------------------------------------------------------------------- adversarial input (§7)


def test_score_survives_adversarial_text_and_never_executes_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = f'__import__("os").system("touch {marker}")'
    texts = [
        "9" * 5000,
        R(H1, "9" * 5000),
        R(H1, "9" * 5000 + "*4*6*1*1"),
        R(H1, "0" * 5000 + "4*6*1*1"),
        R(H1, "(" * 10000 + "4*6*1*1" + ")" * 10000),
        R(H1, "(" * 10000 + "4*6*1*1"),
        R(H1, ")" * 10000),
        R(H1, "4" + "+" * 10000),
        "[" * 100000,
        '{"formula": ' + "[" * 100000 + "]" * 100000 + "}",
        '{"formula": ' + "9" * 5000 + "}",
        '"formula": "' * 10000,
        R(H1, payload),
        R(H1, "4*6*1*1;" + payload),
        '{"formula": "' + payload.replace('"', "'") + '"}',
        R(H1, "\ud800\x00\u202e"),
        R(H1, "٤" * 5000),
        "",
        "\n" * 1000,
    ]
    for text in texts:
        for mode in ("exact", "reference"):
            result = score(text, H1, mode)
            assert isinstance(result, Score) and result.outcome == outcome_of(result.reward)
    assert not marker.exists()
    assert score(R(H1, payload), H1).reason == "illegal characters."
    assert score(R(H1, "9" * 5000), H1).reason == (
        f"you used invalid numbers: [{'9' * 5000}], you didn't use numbers: [4, 6, 1]."
    )
    assert score(R(H1, "0" * 5000 + "4*6*1*1"), H1).reward == -1  # value 4, leading zeros: no eval


def test_exact_mode_rewards_every_solver_string_of_1000_dealt_hands():
    for i in range(1000):
        hand = deal(SPLITS[i % 2], 2024, i)
        for solution in hand.solutions:
            assert score(R(hand, solution + "=24"), hand, "exact").reward == 5, (hand, solution)


# ---------------------------------------------------------------------------- episode (§8)


def test_episode_success_on_attempt_k():
    for k in range(1, 6):
        episode = Episode(H1)
        for _ in range(k - 1):
            assert not episode.done
            episode.record(R(H1, "4*6"))
        episode.record(R(H1, "4*6*1*1"))
        assert (episode.done, episode.success, episode.attempts, episode.truncated) == (True, True, k, False)
        assert len(episode.messages()) == 1 + 2 * (k - 1) + 1
        with pytest.raises(RuntimeError):
            episode.record("again")


def test_episode_always_wrong_stops_after_five_graded_attempts():
    episode = Episode(H1)
    for _ in range(5):
        episode.record(R(H1, "4*6"))
    assert (episode.done, episode.success, episode.attempts, episode.truncated) == (True, False, 5, False)
    assert [s.reward for s in episode.scores] == [-2] * 5


def test_rl_episode_adds_the_truncation_step():
    episode = Episode(H1, rl=True)
    for _ in range(5):
        assert not episode.truncation_pending
        episode.record(R(H1, "4*6"))
    assert not episode.done and episode.truncation_pending and episode.attempts == 5
    assert episode.messages()[-1]["role"] == "user"  # the 5th failure message prompts the 6th generation
    episode.record("anything")
    assert (episode.done, episode.success, episode.attempts, episode.truncated) == (True, False, 5, True)
    rl_success = Episode(H1, rl=True)
    rl_success.record(R(H1, "4*6*1*1"))
    assert rl_success.done and not rl_success.truncated


def test_episode_conversation_and_failure_message():
    episode = Episode(H3, mode="reference")
    first = R(H3, "(11+1)*2*1")
    result = episode.record(first)
    assert result.mode == "reference"
    assert episode.messages() == [
        {"role": "user", "content": render_prompt(H3)},
        {"role": "assistant", "content": first},
        {
            "role": "user",
            "content": "You failed this trial because you used invalid numbers: [11], you didn't use numbers: [10].",
        },
    ]
    assert failure_message("partial solution.") == "You failed this trial because partial solution."
    partial = Episode(H1)
    partial.record(R(H1, "(4*6)*(1*1"))  # +1 is still a failure
    assert not partial.done and partial.messages()[-1]["content"].endswith("partial solution.")


# ---------------------------------------------------------------------------- metrics (§7.2, §9)


def test_wilson_vectors():
    for k, n, (low, high) in ((41, 234, (0.1319, 0.2291)), (168, 234, (0.6571, 0.7717)), (0, 234, (0.0, 0.0162))):
        got = wilson_interval(k, n)
        assert (round(got[0], 4), round(got[1], 4)) == (low, high)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_outcome_labels():
    assert OUTCOMES == ("correct", "partial", "no_solution", "incorrect_number", "illegal_formula", "aggregated_error")
    expected = {5: "correct", 1: "partial", -1: "no_solution", -2: "incorrect_number", -3: "illegal_formula"}
    for reward in (5, 1, 0, -1, -2, -3, -4, -5, -6, -9):
        assert outcome_of(float(reward)) == expected.get(reward, "aggregated_error")


# ------------------------------------------------------------------ multi-turn SFT wrong attempts (§5)


def test_wrong_attempts_score_below_five_and_are_deterministic():
    kinds = set()
    for mode in ("exact", "reference"):
        for i in range(300):
            hand = deal("id", 3, i)
            wrong = wrong_attempt(hand, 3, i, 1.0, mode)
            assert wrong == wrong_attempt(hand, 3, i, 1.0, mode)
            text, reason = wrong
            result = score(text, hand, mode)
            assert result.reward < 5 and result.reason == reason
            # Only the formula line of the reference answer differs.
            ref_lines, wrong_lines = reference_answer(hand).split("\n"), text.split("\n")
            assert [a == b for a, b in zip(ref_lines, wrong_lines)] == [True, True, True, False, True]
            kinds.add(result.outcome if " " not in result.formula else "spaces")
    assert {"spaces", "incorrect_number"} <= kinds and kinds & {"no_solution", "partial", "aggregated_error"}


def test_wrong_attempt_fraction():
    hands = [deal("id", 3, i) for i in range(400)]
    assert all(wrong_attempt(h, 3, h.index, 0.0) is None for h in hands)
    share = sum(wrong_attempt(h, 3, h.index, 0.5) is not None for h in hands) / len(hands)
    assert 0.4 < share < 0.6
    # The same first random() decides: a hand multi-turn at 0.3 is multi-turn at 0.5.
    assert all(wrong_attempt(h, 3, h.index, 0.5) for h in hands if wrong_attempt(h, 3, h.index, 0.3))
