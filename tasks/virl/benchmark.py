"""V-IRL-L behind the benchmark interface (tasks/benchmark.py): what the stages ask of it.

An example is a `Walk`: one route under one split's action rule. Routes are generated
(`routes.generate`) or, with `virl.routes`, taken from the authors' `route_infos.json`, in an
order fixed by the stream's seed (the stream cycles through the file: the authors, too,
train and evaluate on one set of routes). SFT trains on every rail point of a route, one row
each; evaluation and RL walk whole routes.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import polars as pl

from rlheal.config import ConfigError, StudyConfig
from tasks.virl import corpus as pretrain_corpus
from tasks.virl import navigation as nv
from tasks.virl import routes as rt
from tasks.virl.routes import Route

WILSON_Z = 1.959963984540054  # two-sided 95 %


@dataclasses.dataclass(frozen=True)
class Walk:
    """A route under a split's action rule; `index` is its place in the stream it was dealt from."""

    split: str
    index: int | None
    route: Route


class Virl:
    """Follow a route's instruction, one action per rail point; `id` turns by compass
    direction, `ood` by relative direction (tasks/virl/navigation.py)."""

    name = "virl"
    splits = nv.SPLITS
    report_metrics = ("step_accuracy",)
    corpus_version = pretrain_corpus.VERSION
    # DECISION: the split the authors' V-IRL PPO means (their Llama ids 330 1335 794, `"action":`);
    # their code then asserts on that 3-element tensor, which raises, and its fallback weights
    # only the last ~4 response tokens as the action (rl/trainer/model_tz_llama.py)
    action_key = '"action":'
    outcomes = nv.OUTCOMES
    modes = nv.MODES
    attempt_schema = {"action": pl.String}
    column_types = {"steps": pl.Int32, "route_seed": pl.Int64, "route_index": pl.Int64}

    def __init__(self, routes: str | None = None):
        self.file = rt.load(Path(routes)) if routes else None

    def check(self, cfg: StudyConfig) -> None:
        """A routes file must leave routes to train on after the evaluation routes."""
        if self.file is not None and len(self.file) <= cfg.data.eval_size:
            raise ConfigError(
                f"virl.routes: {cfg.virl.routes} holds {len(self.file)} routes and data.eval_size takes {cfg.data.eval_size} "
                "for evaluation: none would be left to train on; lower data.eval_size"
            )

    def _route(self, seed: int, index: int) -> Route:
        if self.file is None:
            return rt.generate(seed, index)
        order = random.Random(f"virl-routes:{seed}").sample(range(len(self.file)), len(self.file))
        return self.file[order[index % len(self.file)]]

    def deal(self, split: str, seed: int, index: int) -> Walk:
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits}; got {split!r}")
        return Walk(split, index, self._route(seed, index))

    def overlap_key(self, walk: Walk, overlap: str) -> tuple:
        """The route itself, whatever the split (both splits walk the same routes) and
        whatever `data.overlap` (a GeneralPoints notion: card order)."""
        return (walk.route.points, walk.route.init_heading)

    def identity(self, walk: Walk) -> list:
        return [[list(p) for p in walk.route.points], walk.route.init_heading]

    def episode(self, walk: Walk, mode: str, verify_iter: int, rl: bool = False) -> nv.Episode:
        return nv.Episode(walk.route, walk.split, mode, verify_iter, rl, example=walk)

    # ------------------------------------------------------------------ data tables

    def sft_rows(self, walk: Walk, cfg: StudyConfig) -> list[dict]:
        """One row per rail point: the prompt there (right actions so far in the history) and
        the answer block with its observation, instruction sentence and action."""
        mode, route = cfg.verifier.mode, walk.route
        points = nv.rail(route, mode)
        return [
            {
                "index": walk.index,
                "step": k,
                "prompt": [{"role": "user", "content": nv.prompt(route, walk.split, points[:k], here, mode)}],
                "completion": [{"role": "assistant", "content": nv.answer(route, walk.split, here, mode)}],
                "multi_turn": False,
            }
            for k, here in enumerate(points)
        ]

    def eval_row(self, walk: Walk, cfg: StudyConfig) -> dict:
        """The route (the authors' record, as JSON) and its first step's prompt and answer:
        the reference CE scores the first step (tasks/benchmark.py point 6)."""
        mode, route = cfg.verifier.mode, walk.route
        points = nv.rail(route, mode)
        first = points[0]
        answer = nv.answer(route, walk.split, first, mode)
        return {
            "split": walk.split,
            "index": walk.index,
            "route": json.dumps(rt.to_record(route)),
            "route_seed": route.seed,
            "route_index": route.index,
            "steps": len(points),
            "prompt": nv.prompt(route, walk.split, [], first, mode),
            "answer": answer,
            "target": answer,
        }

    def from_row(self, row: dict) -> Walk:
        route = rt.from_record(json.loads(row["route"]), f"eval_set_{row['split']} row {row['index']}")
        return Walk(row["split"], row["index"], dataclasses.replace(route, seed=row["route_seed"], index=row["route_index"]))

    # ------------------------------------------------------------------ grading

    def score(self, response: str, walk: Walk, mode: str) -> nv.Score:
        return nv.score(response, nv.rail(walk.route, mode)[0], walk.split, mode)

    def solves(self, s: nv.Score) -> bool:
        return s.outcome == "arrived"

    def solved_rows(self) -> pl.Expr:
        return pl.col("outcome") == "arrived"

    def rescore(self, ep: nv.Episode, mode: str) -> list[float]:
        """Each response against the rail point it answered, on the other mode's rail."""
        points = nv.rail(ep.route, mode)
        return [-1.0 if s.truncated else nv.score(r, points[p], ep.split, mode).reward for s, r, p in zip(ep.scores, ep.responses, ep.points)]

    def score_columns(self, s: nv.Score) -> dict:
        return {"action": s.action}

    def summary_metrics(self, n: pl.Expr, k: pl.Expr, attempts: pl.Expr) -> dict[str, pl.Expr]:
        """Per-step action accuracy over every graded call, retries included, with its Wilson
        95 % interval (calls of one route are not independent: the interval is a lower bound
        on the uncertainty). The authors' CORRECT_ACTION rate also counted their discarded
        third call, which evaluation here does not make. Accuracy itself is route success."""
        right = pl.col("count_correct") + pl.col("count_arrived")
        p, n_, z2 = right / attempts, attempts.cast(pl.Float64), WILSON_Z**2
        centre = (p + z2 / (2 * n_)) / (1 + z2 / n_)
        half = WILSON_Z * ((p * (1 - p) / n_ + z2 / (4 * n_ * n_)).sqrt()) / (1 + z2 / n_)
        return {"step_accuracy": p, "step_accuracy_ci_low": centre - half, "step_accuracy_ci_high": centre + half}

    # ------------------------------------------------------------------ the tiny base

    def phrases(self) -> list[str]:
        """The fixed chunks of the prompt, answer block, action spaces, instruction sentences,
        observations and corrections, the compass and relative words, the landmark words."""
        empty = Route("", "", ((0.0, 0.0), (0.0, 0.0)), (rt.Milestone(0, "north", rt.NO_LANDMARK, 100),), 0)
        here = nv.Point("\0", False, {"id": "\0", "ood": "\0"}, 0)
        pieces = set(nv.prompt(empty, "id", [], here).replace(nv.instruction(empty), "\0").replace(nv.action_space("id"), "\0").split("\0"))
        # The action space's frame is a chunk, its turn sentence is not: the sentence is all
        # that tells the splits apart, and as one token each it was a token the corpus (which
        # words it otherwise) never trained, so OOD read a random vector (issue 17 review).
        pieces |= set(nv.action_space("id").replace(nv._ACTIONS["id"], "\0").split("\0"))
        pieces |= {nv.WRONG_ACTION, nv.NOT_AT_INTERSECTION, nv.AT_AN_INTERSECTION}
        pieces |= set(nv.answer(empty, "id", here).replace(here.observation, "\0").replace(nv.sentences(empty)[0], "\0").split("\0"))
        pieces |= {"You failed this trial because ", "First, turn ", "Turn ", " to face ", "Move forward until you reach next intersection where ",
                   "Move forward until you reach next intersection.", "Move forward until you reach destination where ", nv.NOTHING, rt.NO_LANDMARK,
                   "; " + nv.AT_INTERSECTION, " is on your ", "forward()", "stop()", "turn_direction(", "O_", "A_"}  # fmt: skip
        pieces |= {*rt.COMPASS, *nv.RELATIVE, *rt._FIRST, *rt._SECOND, *rt.SIDES}
        # the pretraining corpus's other action-space wordings and plain answer format
        pieces |= {"x is one of ", "choose x from: ", "x could be any of {", *pretrain_corpus.PLAIN_KEYS}
        words = set(re.findall(r"[A-Za-z]+", " ".join(pieces)))
        return sorted(p for p in pieces | words if p)

    def corpus(self, cfg: StudyConfig) -> pl.DataFrame:
        p = cfg.pretrain
        exclude = pretrain_corpus.evaluation_routes(cfg, self)
        return pretrain_corpus.corpus(p.seed, p.corpus_size, p.benchmark_format_fraction, exclude)

    # ------------------------------------------------------------------ the report

    def report_columns(self, t: dict[str, pl.DataFrame]) -> pl.DataFrame | None:
        """`first_action` per checkpoint and split: the share of routes whose first try names
        the start's right turn, read in the answer block or in the corpus's plain format
        (`action: ...`). A route fails at the start when that turn is wrong, so step accuracy
        on OOD can sit at 0 while this shows what the model writes there, format aside (as
        GeneralPoints' number field shows the rule reading)."""
        tables = [f"eval_set_{s}" for s in self.splits if f"eval_set_{s}" in t]
        if "eval_attempts" not in t or not tables:
            return None
        right = pl.col("answer").str.extract(r'"action": "(.*?)"', 1)
        starts = pl.concat([t[name].select("split", pl.col("index").alias("hand_index"), right.alias("right")) for name in tables])
        first = t["eval_attempts"].filter(pl.col("attempt") == 1).join(starts, on=["split", "hand_index"])
        written = pl.col("response").str.extract(r'action"?: "?([a-z_]+\([a-z ]*\))', 1)
        return first.group_by("ckpt_id", "split").agg(first_action=(written == pl.col("right")).fill_null(False).mean())

    def paper_reference(self) -> None:
        return None  # the paper's V-IRL numbers are end points, not a curve (paper_results.md §2.6)
