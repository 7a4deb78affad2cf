"""GeneralPoints behind the benchmark interface (tasks/benchmark.py): what the stages ask of it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import polars as pl

from rlheal.config import StudyConfig
from tasks.generalpoints import corpus as pretrain_corpus
from tasks.generalpoints.cards import DISPLAY, SPLITS, Hand, deal, make_hand, overlap_key
from tasks.generalpoints.episode import Episode
from tasks.generalpoints.metrics import OUTCOMES
from tasks.generalpoints.prompt import FACE, answer_block, card_list, failure_message, reference_answer, render_prompt
from tasks.generalpoints.sft_wrong import wrong_attempt
from tasks.generalpoints.verifier import MODES, Score, score

PAPER_CSV = Path(__file__).parents[1] / "paper_reference.csv"  # the paper's numbers, both tasks

# Reason texts of the verifier (GP §7.1), in the pieces that do not vary.
REASON_PHRASES = (
    "Correct solution.", "partial solution.", "illegal characters.", "invalid sequence after number",
    "invalid sequence after operator", "invalid sequence before '('", "unmatched closing parenthesis",
    "invalid sequence after ')'", "you used invalid numbers: ", "you used numbers: ", " too many times",
    "you didn't use numbers: ", " is partially correct but the full formula does not match any solution",
    "your formula does not match any solution", "step_limit_reached",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Reference:
    """The paper's curve of a task: rows `stage` (base, sft, rl), `sft_step`, `accuracy_pct`."""

    curve: pl.DataFrame
    window: tuple[int, int]  # the SFT steps RL recovered from, as the paper reads them
    se_pp: float  # sampling error of one point of the curve, percentage points
    label: str


def trained_hand(hand: Hand, answer: str) -> Hand:
    """The hand with the formula SFT trains on as its reference (`data.answer`): the dealt
    reference solution (GP §2 step 4) or the first canonical solution."""
    return dataclasses.replace(hand, reference=hand.solutions[0]) if answer == "first" else hand


class GeneralPoints:
    """Make 24 from four cards; J, Q, K count 10 in `id` and 11, 12, 13 in `ood` (GP)."""

    name = "generalpoints"
    splits = SPLITS
    report_metrics = ()
    corpus_version = pretrain_corpus.VERSION
    action_key = '"formula":'  # training.md §3.4
    outcomes = OUTCOMES
    modes = MODES
    attempt_schema = {"formula": pl.String, "extracted": pl.Boolean}
    column_types = {"n_solutions": pl.Int32}

    deal = staticmethod(deal)
    overlap_key = staticmethod(overlap_key)
    score = staticmethod(score)

    def check(self, cfg: StudyConfig) -> None:
        """Every GeneralPoints config the schema admits can run."""

    def identity(self, hand: Hand) -> list[str]:
        return list(hand.cards)

    def episode(self, hand: Hand, mode: str, verify_iter: int, rl: bool = False) -> Episode:
        return Episode(hand, mode, verify_iter, rl)

    # ------------------------------------------------------------------ data tables

    def sft_rows(self, hand: Hand, cfg: StudyConfig) -> list[dict]:
        return [self.sft_row(hand, cfg)]

    def sft_row(self, hand: Hand, cfg: StudyConfig) -> dict:
        """GP §5: the prompt, optionally a wrong attempt and its failure message first
        (`data.multi_turn_fraction`), and the trained answer block as the completion."""
        hand = trained_hand(hand, cfg.data.answer)
        prompt = [{"role": "user", "content": render_prompt(hand)}]
        wrong = wrong_attempt(hand, cfg.data.train_seed, hand.index, cfg.data.multi_turn_fraction, cfg.verifier.mode)
        if wrong is not None:
            text, reason = wrong
            prompt += [{"role": "assistant", "content": text}, {"role": "user", "content": failure_message(reason)}]
        return {
            "index": hand.index,
            "cards": list(hand.cards),
            "numbers": list(hand.numbers),
            "formula": hand.reference,
            "multi_turn": wrong is not None,
            "prompt": prompt,
            "completion": [{"role": "assistant", "content": reference_answer(hand)}],
        }

    def eval_row(self, hand: Hand, cfg: StudyConfig) -> dict:
        """`target` is the completion an SFT row of the hand would carry, so the reference
        CE measures the answer SFT is trained on (training.md §7.3)."""
        return {
            "split": hand.split,
            "index": hand.index,
            "cards": list(hand.cards),
            "numbers": list(hand.numbers),
            "n_solutions": len(hand.solutions),
            "formula": hand.reference,
            "prompt": render_prompt(hand),
            "answer": reference_answer(hand),
            "target": reference_answer(trained_hand(hand, cfg.data.answer)),
        }

    def from_row(self, row: dict) -> Hand:
        return dataclasses.replace(make_hand(row["cards"], row["split"]), reference=row["formula"], index=row["index"])

    # ------------------------------------------------------------------ attempts and summaries

    def solves(self, s: Score) -> bool:
        return s.reward == 5

    def solved_rows(self) -> pl.Expr:
        return pl.col("reward") == 5

    def rescore(self, ep: Episode, mode: str) -> list[float]:
        """Every attempt answers the same hand: each response graded again under `mode`."""
        responses = [m["content"] for m in ep.messages() if m["role"] == "assistant"]
        return [score(r, ep.hand, mode).reward for r in responses[: len(ep.scores)]]

    def score_columns(self, s: Score) -> dict:
        return {"formula": s.formula, "extracted": s.extracted}

    def summary_metrics(self, n: pl.Expr, k: pl.Expr, attempts: pl.Expr) -> dict[str, pl.Expr]:
        """The authors' rates (GP §9): their logs also counted one -1 truncation step per
        failed hand, so their denominator is attempts + failed hands and that step is a
        `no_solution`; their "correct" rate is accuracy."""
        steps = attempts + n - k
        rates = {f"authors_rate_{o}": (pl.col(f"count_{o}") + (n - k if o == "no_solution" else 0)) / steps for o in OUTCOMES}
        return rates | {"authors_rate_correct": k / n}

    # ------------------------------------------------------------------ the tiny base

    def phrases(self) -> list[str]:
        """Prompt template pieces, answer-block keys, the failure prefix, verifier reasons,
        quoted cards and every word (issue 11: one token per fixed chunk, the face sentence
        word by word so an unseen rule stays readable)."""
        hand = make_hand(["A", "A", "A", "A"], "id")
        cards = card_list(hand.cards)
        pieces: set[str] = set()
        for split in SPLITS:
            text = render_prompt(make_hand(hand.cards, split)).replace(FACE[split], "\0").replace(cards, "\0")
            pieces.update(text.split("\0"))
        pieces.update(answer_block(hand.cards, hand.numbers, "\0").replace(cards, "\0").replace("[1, 1, 1, 1]", "\0").split("\0"))
        pieces.add(failure_message(""))
        pieces.update(REASON_PHRASES)
        pieces.update(f"'{c}'" for c in DISPLAY.values())
        pieces.update((", ", "=24"))
        words = set(re.findall(r"[A-Za-z]+", " ".join([*pieces, *FACE.values()])))
        return sorted(p for p in pieces | words if p)

    def corpus(self, cfg: StudyConfig) -> pl.DataFrame:
        p = cfg.pretrain
        return pretrain_corpus.corpus(p.seed, p.corpus_size, p.benchmark_format_fraction, pretrain_corpus.evaluation_cards(cfg), cfg.data.overlap)

    # ------------------------------------------------------------------ the report

    def report_columns(self, t: dict[str, pl.DataFrame]) -> pl.DataFrame | None:
        """`number_field` per checkpoint and split: the share of first attempts whose
        `"number"` list is the hand's values under the split's rule. It shows how well the
        model still reads the face-card rule, which at small scale moves long before accuracy does."""
        tables = [f"eval_set_{s}" for s in SPLITS if f"eval_set_{s}" in t]
        if "eval_attempts" not in t or not tables:
            return None
        hands = pl.concat([t[name].select("split", pl.col("index").alias("hand_index"), "numbers") for name in tables])
        first = t["eval_attempts"].filter(pl.col("attempt") == 1).join(hands, on=["split", "hand_index"])
        written = pl.col("response").str.extract(r'"number": \[([^\]]*)\]', 1).str.split(", ").cast(pl.List(pl.Int64), strict=False)
        right = (written == pl.col("numbers")).fill_null(False)
        return first.group_by("ckpt_id", "split").agg(number_field=right.mean())

    def paper_reference(self) -> Reference:
        """F1 of the paper: Llama-3.2-11B's OOD accuracy through SFT and after RL from each step."""
        ref = pl.read_csv(PAPER_CSV, schema_overrides={"sft_step": pl.Int64})
        model = "Llama-3.2-11B-Vision-Instruct"
        curve = ref.filter((pl.col("model") == model) & pl.col("source").str.starts_with("fig:llama_ood_recovery_line"))
        # 2.5 pp: the sampling error of one 234-hand evaluation near 17.5 % (paper_results.md)
        return Reference(curve, (420, 1200), 2.5, "Jin et al. 2025, Llama-3.2-11B")
