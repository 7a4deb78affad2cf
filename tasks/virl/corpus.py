"""The V-IRL pretraining corpus of the tiny base (stage `pretrain`, docs/pretrain.md, "V-IRL"):
navigation prompts of the benchmark's shape whose action space states its turn values in
ANOTHER wording than either split's (absolute compass names or relative turns, in varied
order), answered in the benchmark's answer block or in a plain format, on routes of the
corpus's own stream that are never an evaluation route. So the base knows both kinds of
turning, but has never seen the benchmark's prompt under either action space. Pure functions
of (seed, index).
"""

from __future__ import annotations

import re

import polars as pl

from rlheal.config import StudyConfig
from tasks.virl import navigation as nv
from tasks.virl import routes as rt

VERSION = "1"  # of the corpus code: part of the pretrain key (bump on any change to what it writes)

STREAM = "virl-pretrain"  # the corpus routes' namespace (routes.generate): never a study's stream
RULES = {"absolute": rt.COMPASS, "relative": nv.RELATIVE}  # the turn values each rule lists
SPLIT_OF = {"absolute": "id", "relative": "ood"}  # whose right actions a rule's answers write
TURN_SHARE = 0.5  # examples at a turning point (start or intersection); the rest at any rail point
SHUFFLED_ORDER_SHARE = 1 / 3  # action spaces listing the values in another order than the benchmark's
# The action-space sentences, never the benchmark's "x could be any following [...]".
WORDINGS = {
    "one_of": lambda v: "x is one of " + ", ".join(f"'{x}'" for x in v[:-1]) + f" and '{v[-1]}'",
    "choose": lambda v: "choose x from: " + ", ".join(v),
    "braces": lambda v: "x could be any of {" + ", ".join(v) + "}",
}
PLAIN_KEYS = ("observation: ", "instruction: ", "action: ")


def action_space(values: list[str], wording: str) -> str:
    """The benchmark's action-space block with its turn sentence in `wording`."""
    benchmark = nv.action_space("id")
    return benchmark.replace(nv._ACTIONS["id"], WORDINGS[wording](values))


def plain_answer(observation: str, sentence: str, action: str) -> str:
    """The corpus's other answer format: the block's three fields without braces or quotes."""
    return "".join(f"{k}{v}\n" for k, v in zip(PLAIN_KEYS, (observation, sentence, action)))


def example(seed: int, index: int, block_fraction: float, exclude: frozenset = frozenset(), mode: str = "exact") -> dict:
    """Corpus example `index` of stream `seed` (docs/pretrain.md, "V-IRL", in this order):
    a route of the corpus stream that is no evaluation route (`exclude`: their
    (points, initial heading)), a rule, an action-space wording and order, a rail point, the
    prompt there (the rule's right actions so far in the history) and its answer."""
    rng = rt.route_rng(seed, index, f"{STREAM}-example")
    draw = 0
    while True:
        route = rt.generate(seed, index * 1000 + draw, STREAM)
        if (route.points, route.init_heading) not in exclude:
            break
        draw += 1
    rule = rng.choice(sorted(RULES))
    values = list(RULES[rule])
    if rng.random() < SHUFFLED_ORDER_SHARE:
        while values == list(RULES[rule]):
            rng.shuffle(values)
    wording = rng.choice(sorted(WORDINGS))
    points = nv.rail(route, mode)
    turning = [k for k, p in enumerate(points) if p.action["id"].startswith("turn_direction(")]
    step = rng.choice(turning) if rng.random() < TURN_SHARE else rng.randrange(len(points))
    split, here = SPLIT_OF[rule], points[step]
    block = rng.random() < block_fraction
    prompt = nv.prompt(route, split, points[:step], here, mode).replace(nv.action_space(split), action_space(values, wording))
    answer = nv.answer(route, split, here, mode) if block else plain_answer(here.observation, nv.sentences(route, mode)[here.sentence], here.action[split])
    return {
        "index": index,
        "rule": rule,
        "wording": wording,
        "shuffled": values != list(RULES[rule]),
        "format": "block" if block else "plain",
        "step": step,
        "turning": step in turning,
        "action": here.action[split],
        "prompt": prompt,
        "answer": answer,
    }


def evaluation_routes(cfg: StudyConfig, bench) -> frozenset:
    """(points, initial heading) of the study's evaluation routes: the corpus never walks one."""
    d = cfg.data
    return frozenset(bench.overlap_key(bench.deal(split, d.eval_seed, i), d.overlap) for split in bench.splits for i in range(d.eval_size))


def corpus(seed: int, size: int, block_fraction: float, exclude: frozenset = frozenset(), mode: str = "exact") -> pl.DataFrame:
    """The first `size` corpus examples of stream `seed` (a prefix of any longer corpus)."""
    return pl.DataFrame([example(seed, i, block_fraction, exclude, mode) for i in range(size)])


_SPACE = re.compile(r'"turn_direction\(x\)": indicates adjust the ego agent direction towards x direction\. (.*)\n')
_PARSE = {
    "one_of": re.compile(r"x is one of ((?:'[a-z ]+', )*'[a-z ]+') and '([a-z ]+)'"),
    "choose": re.compile(r"choose x from: ([a-z ]+(?:, [a-z ]+)*)"),
    "braces": re.compile(r"x could be any of \{([a-z ]+(?:, [a-z ]+)*)\}"),
}


def stated_values(prompt: str) -> tuple[str, list[str]]:
    """(wording, turn values) the prompt's action space states, for the corpus checks; the
    benchmark's own sentence reads as wording `benchmark`. ValueError for anything else."""
    m = _SPACE.search(prompt)
    if not m:
        raise ValueError("prompt has no turn_direction action space")
    sentence = m.group(1)
    for name, benchmark in nv._ACTIONS.items():
        if sentence == benchmark:
            return "benchmark", list(RULES["absolute" if name == "id" else "relative"])
    for wording, pattern in _PARSE.items():
        if found := pattern.fullmatch(sentence):
            if wording == "one_of":
                return wording, [*(v.strip("'") for v in found.group(1).split(", ")), found.group(2)]
            return wording, found.group(1).split(", ")
    raise ValueError(f"not an action-space sentence: {sentence!r}")
