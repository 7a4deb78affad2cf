"""The multi-attempt episode of one hand (GP §8), shared by evaluation and PPO rollouts.

Pure bookkeeping: the caller generates text from `messages()` and hands it to `record()`.
"""

from __future__ import annotations

from tasks.generalpoints.cards import Hand
from tasks.generalpoints.prompt import failure_message, render_prompt
from tasks.generalpoints.verifier import Score, extract_formula, score

STEP_LIMIT_REASON = "step_limit_reached"


class Episode:
    """Up to `verify_iter` graded attempts on one hand; ends at the first +5.

    In RL mode (`rl=True`) five graded failures are followed by one more, ungraded
    generation (reward -1, `truncated`), after which the episode ends as a truncation.
    Evaluation does not produce that generation (GP §8, DECISION).
    """

    def __init__(self, hand: Hand, mode: str = "exact", verify_iter: int = 5, rl: bool = False):
        if verify_iter < 1:
            raise ValueError(f"verify_iter must be >= 1; got {verify_iter}")
        self.hand = hand
        self.mode = mode
        self.verify_iter = verify_iter
        self.rl = rl
        self.scores: list[Score] = []  # graded attempts, then the truncation step if any
        self._messages = [{"role": "user", "content": render_prompt(hand)}]

    def messages(self) -> list[dict]:
        """The conversation so far (a copy). While the episode runs it ends with the user
        turn the next generation answers; every recorded response is in it as an
        assistant turn, followed by the failure message when the attempt was graded < 5."""
        return [dict(m) for m in self._messages]

    @property
    def example(self) -> Hand:
        """The hand, under the benchmark interface's name (tasks/benchmark.py)."""
        return self.hand

    @property
    def responses(self) -> list[str]:
        """Every recorded response, in order (a resume replays them)."""
        return [m["content"] for m in self._messages if m["role"] == "assistant"]

    @property
    def attempts(self) -> int:
        """Graded attempts so far (the truncation step is not one)."""
        return len(self.scores) - self.truncated

    @property
    def success(self) -> bool:
        return bool(self.scores) and self.scores[-1].reward == 5

    @property
    def truncated(self) -> bool:
        return bool(self.scores) and self.scores[-1].truncated

    @property
    def truncation_pending(self) -> bool:
        """True when the next generation is the ungraded RL step."""
        return self.rl and not self.success and len(self.scores) == self.verify_iter

    @property
    def done(self) -> bool:
        if self.success or self.truncated:
            return True
        return len(self.scores) >= self.verify_iter and not self.rl

    def record(self, response: str) -> Score:
        """Grade (or, for the RL truncation step, just log) one generated response."""
        if self.done:
            raise RuntimeError("record() called on a finished episode")
        self._messages.append({"role": "assistant", "content": response})
        if self.truncation_pending:
            formula, extracted = extract_formula(response)
            result = Score(-1.0, "no_solution", STEP_LIMIT_REASON, formula, extracted, False, self.mode, truncated=True)
        else:
            result = score(response, self.hand, self.mode)
            if result.reward != 5:
                # Sent even after the last graded attempt: in RL it prompts the truncation step.
                self._messages.append({"role": "user", "content": failure_message(result.reason)})
        self.scores.append(result)
        return result
