"""The exact 24 solver and its canonical order (GP §3).

Candidates, in canonical order: distinct permutations (a, b, c, d) sorted ascending; the
64 operator triples (o1, o2, o3) over `+ - * /`, o3 fastest; the seven bracket patterns
below. A candidate is kept when its exact value is 24; one dividing by zero is skipped.

Speed: all 1,820 card multisets are solved in a couple of seconds. Each bracket pattern
is one expression tree; the seven trees share sub-expressions (a o1 b, c o3 d, ...), so
those are computed once per permutation, and the flat pattern `a o1 b o2 c o3 d` always
equals one of the bracketed ones under the usual precedence. Card values are screened
in floating point; `_TOLERANCE` explains why that screen is exact for them.
"""

from __future__ import annotations

import itertools
import operator
from fractions import Fraction
from functools import lru_cache

TARGET = 24
OPERATORS = "+-*/"
PATTERNS = (
    "{a}{o1}{b}{o2}{c}{o3}{d}",
    "({a}{o1}{b}){o2}{c}{o3}{d}",
    "({a}{o1}{b}{o2}{c}){o3}{d}",
    "{a}{o1}({b}{o2}{c}){o3}{d}",
    "{a}{o1}({b}{o2}{c}{o3}{d})",
    "{a}{o1}{b}{o2}({c}{o3}{d})",
    "({a}{o1}{b}){o2}({c}{o3}{d})",
)

# Division by zero yields NaN, which propagates through every later operation (for
# floats and Fractions alike) and never equals 24: the candidate is thereby skipped.
_NAN = float("nan")


def _divide(x, y):
    return x / y if y else _NAN


_APPLY = (operator.add, operator.sub, operator.mul, _divide)  # indexed like OPERATORS

# For integer cards 0..13 every value of a 4-card expression is p/q with |q| <= 13**3, so
# a value other than 24 is at least 1/2197 away from it, while floating-point error on
# these small magnitudes stays below 1e-8. A float within 1e-6 of 24 is therefore exactly
# 24 and no exact 24 falls outside. Other inputs are solved in Fractions (tolerance 0).
_TOLERANCE = 1e-6
_CARD_RANGE = range(0, 14)


def solve(values) -> list[str]:
    """All canonical solver strings for four values (GP §3), e.g. [3, 3, 8, 8] -> ['8/(3-8/3)']."""
    values = tuple(values)
    if len(values) != 4:
        raise ValueError(f"solve needs 4 values; got {list(values)!r}")
    return list(solve_multiset(tuple(sorted(values))))


@lru_cache(maxsize=None)
def solve_multiset(values: tuple) -> tuple[str, ...]:
    """Solutions of a sorted 4-tuple. The answer depends only on the multiset (the
    permutations are sorted), so it is cached: each card multiset is solved once per process."""
    cards = all(type(v) is int and v in _CARD_RANGE for v in values)
    number, tolerance = (float, _TOLERANCE) if cards else (Fraction, 0)
    found = []
    for perm in sorted(set(itertools.permutations(values))):
        hits = _hits(*(number(v) for v in perm), tolerance)
        names = dict(zip("abcd", (str(v) for v in perm)))
        for o1, o2, o3, pattern in hits:
            ops = {"o1": OPERATORS[o1], "o2": OPERATORS[o2], "o3": OPERATORS[o3]}
            found.append(PATTERNS[pattern].format(**names, **ops))
    return tuple(found)


def _hits(a, b, c, d, tolerance):
    """(o1, o2, o3, pattern) of the candidates of one permutation whose value is 24,
    in canonical order (operators, then pattern)."""
    f = _APPLY
    ab = [f[i](a, b) for i in range(4)]
    bc = [f[j](b, c) for j in range(4)]
    cd = [f[k](c, d) for k in range(4)]
    hits = []
    for i in range(4):
        fi, i_low = f[i], i < 2
        for j in range(4):
            fj, j_low = f[j], j < 2
            # a o1 b o2 c and b o2 c ... under the usual precedence: `o2` binds first
            # only when it is * or / and o1 is + or -.
            abc = fi(a, bc[j]) if (not j_low and i_low) else fj(ab[i], c)
            ab_c = fj(ab[i], c)  # (a o1 b) o2 c
            a_bc = fi(a, bc[j])  # a o1 (b o2 c)
            for k in range(4):
                fk, k_low = f[k], k < 2
                bcd = fj(b, cd[k]) if (not k_low and j_low) else fk(bc[j], d)
                p7 = fj(ab[i], cd[k])  # (a o1 b) o2 (c o3 d)
                p3 = fk(abc, d)  # (a o1 b o2 c) o3 d
                p5 = fi(a, bcd)  # a o1 (b o2 c o3 d)
                # a o1 b o2 c o3 d: a trailing + or - comes last (p3); otherwise a + or -
                # at o2 splits it into two terms (p7); otherwise a + or - at o1 makes
                # a o1 (b o2 c o3 d) (p5); all of * and / run left to right (p3).
                p1 = p3 if k_low else (p7 if j_low else (p5 if i_low else p3))
                # (a o1 b) o2 c o3 d
                p2 = p7 if (not k_low and j_low) else fk(ab_c, d)
                # a o1 (b o2 c) o3 d
                p4 = fi(a, fk(bc[j], d)) if (not k_low and i_low) else fk(a_bc, d)
                # a o1 b o2 (c o3 d)
                p6 = fi(a, fj(b, cd[k])) if (not j_low and i_low) else p7
                for pattern, value in enumerate((p1, p2, p3, p4, p5, p6, p7)):
                    if -tolerance <= value - TARGET <= tolerance:
                        hits.append((i, j, k, pattern))
    return hits
