"""V-IRL-L navigation: instruction, rail, prompt, verifier and episode (issue 17; the authors'
`gym_virl` NavigationEnvironment and `step_rewards_virl`, SFTvsRL @ 5a6ea55).

The two splits share the routes and differ only in the action rule: `id` answers turns with
compass directions (`turn_direction(south)`), `ood` with relative ones
(`turn_direction(slightly left)`), labelled from delta = next heading - previous heading:
delta < -45 left, delta > 45 right, -45 <= delta <= 0 slightly left, else slightly right.

Verifier modes, as GeneralPoints' two:
- `exact` (default): delta is wrapped into (-180, 180] (350 -> 10 degrees is a slight right
  turn), and an intersection claim is checked against the whole observation;
- `reference`: the authors' code, quirks kept: delta is not wrapped (350 -> 10 is "left"),
  and the claim is checked against the landmark part only, which holds no "intersection",
  so a correct claim at an intersection with a wrong action earns -1.5.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

from tasks.virl.routes import NO_LANDMARK, Route

SPLITS = ("id", "ood")
MODES = ("exact", "reference")
OUTCOMES = ("correct", "arrived", "wrong_action", "wrong_observation", "no_action")
STEP_LIMIT = 300  # every generation counts, retries included (the authors' TimeLimit)
FORWARD_POINTS = 5  # interpolated forward() points per leg, each dropped with DROP_RATE
DROP_RATE = 0.5
RELATIVE = ("left", "right", "slightly left", "slightly right")
NOTHING = "No landmarks nearby"  # the start's and the walking points' landmark text (plural)
AT_INTERSECTION = "You observe an intersection"

_PROMPT = (
    "\n[Task Description]\n"
    "You are an expert in navigation. You will receive a sequence of instructions to follow. You\n"
    "are also provided with your observation and action history in text. Your goal is to first analyze the instruction and identify the next sentence to be executed. \n"
    "Then, you need to provide the action to be taken based on the current observation and instruction.\n\n"
    "[Instruction]\n{instruction}\n\n"
    "[Action space]\n{action_space}\n\n"
    "[Observations and actions sequence]\n{history}\n\n"
    "[Output]\n{{\n"
    '  "current observation": latest observation from the observation sequence,\n'
    '  "current instruction": analyze the full instruction and identify the sentence to be executed,\n'
    '  "action": the action to be taken chosen from the action space,\n'
    "}}\n"
)
_ACTIONS = {
    "id": "x could be any following 8 directions ['north', 'northeast', 'east', 'southeast', 'south', 'southwest', 'west', 'northwest']",
    "ood": "x could be any following ['left', 'right', 'slightly left', 'slightly right']",
}
_RETRY = (
    ' Please avoid this {what} and try again in the same format:\n[Output]\n{{{{\n'
    '  "current observation": latest observation from the streetview grid,\n'
    '  "current instruction": analyze the full instruction and identify the sentence to be executed,\n'
    '  "action": the action to be taken chosen from the action space,\n}}}}.'
)
WRONG_ACTION = "you make incorrect action." + _RETRY.format(what="action")
NOT_AT_INTERSECTION = "you are not at any intersection." + _RETRY.format(what="observation")
AT_AN_INTERSECTION = "you are at an intersection." + _RETRY.format(what="observation")
_ACTION = re.compile(r'"action": "(.*?)"')
_OBSERVATION = re.compile(r'"current observation": "(.*?)"')


def _field(response: str, key: str, pattern: re.Pattern) -> str | None:
    """A field of the answer as the authors read it: JSON first, then their regex."""
    try:
        value = json.loads(response).get(key)
        if isinstance(value, str):
            return value
    except (ValueError, AttributeError):
        pass
    m = pattern.search(response)
    return m.group(1) if m else None


def action_space(split: str) -> str:
    return (
        '"forward()": indicates moving forward one step\n'
        f'"turn_direction(x)": indicates adjust the ego agent direction towards x direction. {_ACTIONS[split]}\n'
        '"stop()": indicates the navigation is finished.'
    )


def relative(previous: int, heading: int, mode: str = "exact") -> str:
    """The relative turn from `previous` to `heading` (module docstring); `reference` does not wrap."""
    delta = heading - previous
    if mode == "exact":
        delta = (delta + 180) % 360 - 180 if delta % 360 != 180 else 180
    if delta < -45:
        return "left"
    if delta > 45:
        return "right"
    return "slightly left" if delta <= 0 else "slightly right"


def turns(route: Route, mode: str = "exact") -> list[str]:
    """The relative word of each milestone's turn, the first from the initial heading."""
    previous, out = route.init_heading, []
    for m in route.milestones:
        out.append(relative(previous, m.heading, mode))
        previous = m.heading
    return out


def instruction(route: Route, mode: str = "exact") -> str:
    """The numbered instruction: a turn and a walk per milestone; every turn names both the
    relative word and the compass direction (the same text in both splits)."""
    sentences = []
    last = len(route.milestones) - 1
    for i, (m, word) in enumerate(zip(route.milestones, turns(route, mode))):
        # the authors' "First, turn" opens every route but a one-leg one
        sentences.append(f"{'First, turn' if i == 0 and i != last else 'Turn'} {word} to face {m.direction}.")
        if i == last:
            sentences.append(f"Move forward until you reach destination where {m.landmarks}.")
        elif m.landmarks == NO_LANDMARK:
            sentences.append("Move forward until you reach next intersection.")
        else:
            sentences.append(f"Move forward until you reach next intersection where {m.landmarks}.")
    return "".join(f"{k + 1}. {s}\n" for k, s in enumerate(sentences))


@dataclasses.dataclass(frozen=True)
class Point:
    """One rail point: what is seen there and the one right action (per split)."""

    landmarks: str
    intersection: bool
    action: dict[str, str]  # split -> the action
    sentence: int  # the instruction sentence being carried out (0-based)

    @property
    def observation(self) -> str:
        return f"{self.landmarks}; {AT_INTERSECTION if self.intersection else ''}"


def rail(route: Route, mode: str = "exact") -> list[Point]:
    """The ground truth: the start (turn to the first heading), per leg FORWARD_POINTS - 1
    walking points each kept with probability 1 - DROP_RATE, each intersection (turn to the
    next heading) and the destination (stop). DECISION: the authors interpolate 5 points per
    leg, but their 5th is the next intersection itself and their relocation step (the
    official config) always removes it, so 4 candidates remain. The drops come from a stream
    of the route's own (its seed and index, or for a loaded route its content), so both
    splits walk the same rail."""
    if route.seed is None:
        rng = random.Random(repr(("virl-rail", route.points, route.init_heading)))
    else:
        rng = random.Random(f"virl-rail:{route.seed}:{route.index}")
    words = turns(route, mode)
    ms = route.milestones
    out = [Point(NOTHING, False, {"id": f"turn_direction({ms[0].direction})", "ood": f"turn_direction({words[0]})"}, 0)]
    for i, m in enumerate(ms):
        for _ in range(FORWARD_POINTS - 1):  # the 5th interpolated point is the next milestone itself
            if rng.random() >= DROP_RATE and m.distance > 5:
                out.append(Point(NOTHING, False, {"id": "forward()", "ood": "forward()"}, 2 * i + 1))
        if i == len(ms) - 1:  # stop() carries out the last walking sentence
            out.append(Point(m.landmarks, False, {"id": "stop()", "ood": "stop()"}, 2 * i + 1))
        else:
            nxt = ms[i + 1]
            out.append(Point(m.landmarks, True, {"id": f"turn_direction({nxt.direction})", "ood": f"turn_direction({words[i + 1]})"}, 2 * i + 2))
    return out


def prompt(route: Route, split: str, done: list[Point], here: Point, mode: str = "exact") -> str:
    """The prompt at a rail point: instruction, action space, and the observations with the
    right actions so far (`O_k: ...` / `A_k: ...`), the current one left open."""
    history = "".join(f"O_{k + 1}: {p.observation}\nA_{k + 1}: {p.action[split]}\n" for k, p in enumerate(done))
    history += f"O_{len(done) + 1}: {here.observation}\nA_{len(done) + 1}: \n"
    return _PROMPT.format(instruction=instruction(route, mode), action_space=action_space(split), history=history)


def sentences(route: Route, mode: str = "exact") -> list[str]:
    """The instruction's sentences without their numbers."""
    return [line.split(". ", 1)[1] for line in instruction(route, mode).splitlines()]


def answer(route: Route, split: str, here: Point, mode: str = "exact") -> str:
    """The SFT target at a rail point (the authors' ResponseVIRL)."""
    sentence = sentences(route, mode)[here.sentence]
    return f'\n{{\n  "current observation": "{here.observation}",\n  "current instruction": "{sentence}",\n  "action": "{here.action[split]}",\n}}\n'


@dataclasses.dataclass(frozen=True, slots=True)
class Score:
    """One graded step (the authors' step_rewards_virl)."""

    reward: float
    outcome: str
    reason: str
    action: str
    format_error: bool
    mode: str
    truncated: bool = False


def score(response: str, point: Point, split: str, mode: str = "exact") -> Score:
    """+1 for the right action (`arrived` when it is the final stop()); otherwise -1.5 when
    the response's observation is wrong about an intersection, else -1."""
    found = _field(response, "action", _ACTION)
    action = "None" if found is None else found
    if action == point.action[split]:
        return Score(1.0, "arrived" if action == "stop()" else "correct", "Correct action.", action, False, mode)
    said = "intersection" in (_field(response, "current observation", _OBSERVATION) or "")
    truth = "intersection" in (point.landmarks if mode == "reference" else point.observation)
    if said != truth:
        return Score(-1.5, "wrong_observation", AT_AN_INTERSECTION if truth else NOT_AT_INTERSECTION, action, found is None, mode)
    return Score(-1.0, "no_action" if found is None else "wrong_action", WRONG_ACTION, action, found is None, mode)


class Episode:
    """One route walked to the end (`tasks/benchmark.py` point 4). Each rail point is a fresh
    prompt; a wrong action gets the correction as the next user turn and another try, up to
    `verify_iter` graded tries per point. Then the route ends unsolved: in evaluation at
    once, in RL (`rl=True`) after one more, ungraded generation (reward -1, truncated), the
    authors' discarded third call. A right `stop()` at the destination solves the route;
    STEP_LIMIT generations end it truncated."""

    def __init__(self, route: Route, split: str, mode: str = "exact", verify_iter: int = 2, rl: bool = False, example=None):
        if verify_iter < 1:
            raise ValueError(f"verify_iter must be >= 1; got {verify_iter}")
        self.route, self.split, self.mode, self.verify_iter, self.rl = route, split, mode, verify_iter, rl
        self._example = route if example is None else example
        self.rail = rail(route, mode)
        self.position = 0  # index into the rail
        self.scores: list[Score] = []
        self.points: list[int] = []  # rail position each score was graded at
        self.responses: list[str] = []  # every recorded response, in order
        self._turns: list[dict] = []  # the current point's tries and corrections
        self.success = self.truncated = False

    @property
    def example(self):
        """What the episode was dealt (a route, or the benchmark's example holding it)."""
        return self._example

    def tries(self) -> int:
        """Graded tries at the current point."""
        return sum(1 for i in self.points if i == self.position) if not self.done else 0

    @property
    def truncation_pending(self) -> bool:
        return self.rl and not self.done and self.tries() == self.verify_iter

    @property
    def done(self) -> bool:
        if self.success or self.truncated:
            return True
        at_point = sum(1 for i in self.points if i == self.position)
        return (at_point >= self.verify_iter and not self.rl) or len(self.scores) >= STEP_LIMIT

    def messages(self) -> list[dict]:
        here = self.rail[self.position]
        first = {"role": "user", "content": prompt(self.route, self.split, self.rail[: self.position], here, self.mode)}
        return [first, *(dict(m) for m in self._turns)]

    def record(self, response: str) -> Score:
        if self.done:
            raise RuntimeError("record() called on a finished episode")
        here = self.rail[self.position]
        if self.truncation_pending:
            result = Score(-1.0, "no_action", "Exceed maximum verify steps", "None", False, self.mode, truncated=True)
            self.truncated = True
        else:
            result = score(response, here, self.split, self.mode)
        self.scores.append(result)
        self.points.append(self.position)
        self.responses.append(response)
        if result.truncated:
            return result
        if result.reward == 1.0:
            self._turns = []
            if result.outcome == "arrived":
                self.success = True
            else:
                self.position += 1
        else:
            self._turns += [{"role": "assistant", "content": response}, {"role": "user", "content": f"You failed this trial because {result.reason}"}]
        if not self.success and len(self.scores) >= STEP_LIMIT:
            # DECISION: cut at the limit, unsolved (the authors' TimeLimit left is_success True)
            self.truncated = True
            result = self.scores[-1] = dataclasses.replace(result, truncated=True)
        return result
