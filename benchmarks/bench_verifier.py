"""Verifier throughput: `score` in both modes against the authors' way of grading.

    python benchmarks/bench_verifier.py [--n 100000] [--seed 0]

Builds n responses over dealt hands (a realistic mix: correct solver strings, other
correct formulas, wrong numbers, wrong operators, malformed text, unclosed parentheses,
division by zero, bare JSON) and times three graders on the same list:
- `reference`, `exact`: the package's `score` (own parser, set lookups for prefixes);
- `baseline`: the authors' approach, re-written here (regex extraction, character check,
  Python `eval` of the formula in floats, solver-prefix checks by scanning the list of
  solver strings). It is the ONLY place in the project that calls eval, and only on
  formulas that passed the character check; it exists to be measured against.
Prints responses/s of each, the speed ratios, and how often baseline and `reference`
agree. Standard library plus the package only (no torch).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.generalpoints import deal, score  # noqa: E402
from tasks.generalpoints.prompt import answer_block  # noqa: E402
from tasks.benchmark import eval_examples, get  # noqa: E402

GP = get("generalpoints")

# ------------------------------------------------------------------ the response mix


def _tokens(formula):
    return re.findall(r"\d+|[+\-*/()]", formula)


def _response(hand, rng):
    """One response for a hand, drawn from the mix; returns (kind, text)."""
    solution = rng.choice(hand.solutions)
    tokens = _tokens(solution)
    numbers = [i for i, t in enumerate(tokens) if t.isdigit()]
    operators = [i for i, t in enumerate(tokens) if t in "+-*/"]
    block = lambda formula: answer_block(hand.cards, hand.numbers, formula)  # noqa: E731
    kind = rng.choices(
        ["correct", "extra_parens", "wrong_number", "wrong_operator", "malformed", "unclosed", "div_zero", "json"],
        weights=[35, 5, 15, 15, 12, 8, 5, 5],
    )[0]
    if kind == "correct":
        return kind, block(solution + "=24")
    if kind == "extra_parens":
        return kind, block(f"({solution})=24")
    if kind == "wrong_number":
        i = rng.choice(numbers)
        tokens[i] = str(rng.choice([v for v in range(1, 14) if v not in hand.numbers]))
        return kind, block("".join(tokens) + "=24")
    if kind == "wrong_operator":
        i = rng.choice(operators)
        tokens[i] = rng.choice([o for o in "+-*/" if o != tokens[i]])
        return kind, block("".join(tokens) + "=24")
    if kind == "malformed":
        return kind, rng.choice(
            [
                block(" * ".join(str(n) for n in hand.numbers) + " = 24"),
                block(solution.replace("*", "×")),
                block(solution + "=24").replace('"formula": "', '"formula":"'),
                "I think the answer is " + solution,
                block(solution).replace('"', "'"),
            ]
        )
    if kind == "unclosed":
        return kind, block(solution[:-1] if solution.endswith(")") else "(" + solution)
    if kind == "div_zero":
        a, b = hand.numbers[0], hand.numbers[1]
        return kind, block(f"{a}/({b}-{b})*{hand.numbers[2]}+{hand.numbers[3]}")
    return kind, json.dumps({"cards": list(hand.cards), "number": list(hand.numbers), "formula": solution + "=24"})


def build(n, seed):
    rng = random.Random(seed)
    hands = [deal(split, seed, i) for i in range(500) for split in ("id", "ood")]
    items = []
    for _ in range(n):
        hand = rng.choice(hands)
        kind, text = _response(hand, rng)
        items.append((hand, kind, text))
    return items


# ------------------------------------------------------------- AUTHORS' BASELINE (uses eval)


def baseline_score(response, hand):
    """The authors' way (re-written for this benchmark): reward and reason."""
    formula = _baseline_extract(response)
    tokens = re.findall(r"\d+|[+\-*/()]", formula)
    if "".join(tokens) != formula:
        return -3, "illegal characters."
    reward, messages = 0, []
    previous, stack = None, []
    for token in tokens:
        kind = "operator" if token in "+-*/" else token if token in "()" else "number"
        if kind == "number" and previous not in (None, "operator", "("):
            reward, messages = reward - 3, messages + ["invalid sequence after number"]
        elif kind == "operator" and previous not in ("number", ")"):
            reward, messages = reward - 3, messages + ["invalid sequence after operator"]
        elif kind == "(":
            if previous in (None, "operator", "("):
                stack.append(token)
            else:
                reward, messages = reward - 3, messages + ["invalid sequence before '('"]
        elif kind == ")":
            if previous not in ("number", ")"):
                reward, messages = reward - 3, messages + ["invalid sequence after ')'"]
            elif stack:
                stack.pop()
            else:
                reward, messages = reward - 3, messages + ["unmatched closing parenthesis"]
        previous = kind
    used = Counter(int(t) for t in re.findall(r"\d+", formula))
    held = Counter(hand.numbers)
    invalid = [v for v in used if v not in held]
    overused = [v for v in used if used[v] > held[v]]
    if invalid:
        reward, messages = reward - 2, messages + [f"you used invalid numbers: {invalid}"]
    elif overused:
        reward, messages = reward - 2, messages + [f"you used numbers: {overused} too many times"]
    underused = [v for v in held if held[v] > used[v]]
    if underused:
        reward, messages = reward - 2, messages + [f"you didn't use numbers: {underused}"]
    if reward != 0:
        return reward, ", ".join(messages) + "."
    solutions = list(hand.solutions)
    try:
        if eval(formula) == 24:  # noqa: S307  the authors' baseline, measured, never used
            return 5, "Correct solution."
    except Exception:
        if any(s.startswith(formula) for s in solutions):
            return 1, "partial solution."
    register = ""
    for token in tokens:
        previous_register, register = register, register + token
        if not any(s.startswith(register) for s in solutions):
            if previous_register == "":
                return -1, "your formula does not match any solution."
            return -1, f"{previous_register} is partially correct but the full formula does not match any solution."
    return 0, "."


def _baseline_extract(response):
    try:
        document = json.loads(response)
        if isinstance(document, dict) and "formula" in document:
            return str(document["formula"]).split("=")[0]
    except ValueError:
        pass
    match = re.search(r'"formula": "(.*?)"', response)
    return match.group(1).split("=")[0] if match else "None"


# ------------------------------------------------------------------------------- timing


def timed(label, grade, items):
    start = time.perf_counter()
    results = [grade(text, hand) for hand, _, text in items]
    seconds = time.perf_counter() - start
    print(f"{label:>10}: {len(items) / seconds:12,.0f} responses/s  ({seconds:.2f} s)")
    return results, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of responses")
    parser.add_argument("--seed", type=int, default=0, help="hand stream and mix seed")
    args = parser.parse_args(argv)

    items = build(args.n, args.seed)
    mix = Counter(kind for _, kind, _ in items)
    print(f"{args.n:,} responses over {len({id(h) for h, _, _ in items}):,} hands; mix: {dict(mix)}")
    for hand, _, text in items[:2000]:  # warm the per-multiset prefix caches (built once per process)
        score(text, hand, "exact")

    reference, t_ref = timed("reference", lambda t, h: score(t, h, "reference"), items)
    exact, t_exact = timed("exact", lambda t, h: score(t, h, "exact"), items)
    baseline, t_base = timed("baseline", baseline_score, items)
    print(f"speed-up over baseline: reference x{t_base / t_ref:.2f}, exact x{t_base / t_exact:.2f}")

    same_reward = sum(r.reward == b[0] for r, b in zip(reference, baseline))
    same_reason = sum(r.reason == b[1] for r, b in zip(reference, baseline))
    modes_differ = sum(r.reward != e.reward for r, e in zip(reference, exact))
    print(f"baseline vs reference: rewards agree {same_reward / args.n:.4%}, reasons agree {same_reason / args.n:.4%}")
    print(f"exact vs reference: rewards differ on {modes_differ} responses (float caveat, GP §3)")
    prepare_sft(args.n)


def prepare_sft(n: int) -> None:
    """Time the data stage's SFT rows: dealing, solving, rendering, one Parquet write."""
    import tempfile
    import time
    from pathlib import Path

    from rlheal.config import parse_config
    from rlheal.store import write_parquet
    from tasks import data

    cfg = parse_config({"name": "bench", "data": {"train_size": n, "multi_turn_fraction": 0.1}, "sft": {"save_steps": [0, 1]}})
    t0 = time.perf_counter()
    hands = eval_examples(GP, cfg.data.eval_seed, cfg.data.eval_size)
    table, _, _ = data.sft_table(GP, cfg, {GP.overlap_key(h, "ordered") for s in hands for h in hands[s]})
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        write_parquet(table, Path(tmp) / "sft_train.parquet")
        size = (Path(tmp) / "sft_train.parquet").stat().st_size
    t2 = time.perf_counter()
    print(f"prepare {n:,} SFT examples: {t1 - t0:.2f} s rows ({n / (t1 - t0):,.0f} rows/s), {t2 - t1:.2f} s Parquet ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
