"""PPO rollouts: E environments advance together, one batched generate per round
(training.md §3.2, GP §8).

An environment is the episode of its current example (`Benchmark.episode(rl=True)`); for
GeneralPoints: success -> next hand; failure -> the failure message; after the 5th graded
failure the next round produces the ungraded truncation generation (reward -1), then the
next hand. New examples come from the shared training stream in order of need, in
environment index order within a round. Episodes persist across updates, and their state
(examples and responses so far) is what a resume point stores.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch

from tasks.chat import encode, left_pad, render
from tasks.lm import generation_config, only
from tasks.benchmark import Benchmark, Episode

Messages = list[dict[str, str]]


class Envs:
    """`n` environments over one training stream of `bench`'s examples. `examples_from(i)`
    yields the stream's examples with index >= i; `state()` / `restore()` carry the episodes
    across a resume."""

    def __init__(self, bench: Benchmark, n: int, examples_from: Callable[[int], Iterator], seed: int, mode: str, verify_iter: int):
        self.bench, self.examples_from, self.seed, self.mode, self.verify_iter = bench, examples_from, seed, mode, verify_iter
        self.next_index = 0
        self._examples = examples_from(0)
        self.episodes = [self._new_episode() for _ in range(n)]

    def _episode(self, example) -> Episode:
        return self.bench.episode(example, self.mode, self.verify_iter, rl=True)

    def _new_episode(self) -> Episode:
        example = next(self._examples)
        self.next_index = example.index + 1
        return self._episode(example)

    def conversations(self) -> list[Messages]:
        return [ep.messages() for ep in self.episodes]

    def step(self, e: int, response: str):
        """Record environment e's response; returns (score, episode finished, episode solved).
        A finished episode is replaced by the next example at once."""
        ep = self.episodes[e]
        score = ep.record(response)
        if ep.done:
            self.episodes[e] = self._new_episode()
        return score, ep.done, ep.success

    def state(self) -> dict:
        return {"next_index": self.next_index, "episodes": [{"index": ep.example.index, "responses": list(ep.responses)} for ep in self.episodes]}

    def restore(self, state: dict) -> None:
        """Rebuild the episodes in flight by replaying their responses (scoring is deterministic)."""
        self.episodes = []
        for saved in state["episodes"]:
            ep = self._episode(self.bench.deal(self.bench.splits[0], self.seed, saved["index"]))
            for response in saved["responses"]:
                ep.record(response)
            self.episodes.append(ep)
        self.next_index = state["next_index"]
        self._examples = self.examples_from(self.next_index)


class Generator:
    """One left-padded, KV-cached generate call over many prompts, with the study's
    decoding only (training.md §6); returns the generated token ids of each row up to
    and including its stop token (none when it hit max_new_tokens)."""

    def __init__(self, model, tok, decoding: dict, date_string: str | None, precision: Callable = contextlib.nullcontext):
        self.model, self.tok, self.date_string, self.precision = model, tok, date_string, precision
        self.config = generation_config(decoding, tok)
        self.stops = set(self.config.eos_token_id)

    def prompt_ids(self, messages: Messages) -> list[int]:
        return encode(self.tok, render(self.tok, messages, add_generation_prompt=True, date_string=self.date_string))

    def text(self, response: list[int]) -> str:
        """The raw output that goes into the conversation: stop token dropped, special tokens skipped."""
        body = response[:-1] if response and response[-1] in self.stops else response
        return self.tok.decode(body, skip_special_tokens=True)

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]]) -> list[list[int]]:
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompts, self.tok.pad_token_id)
        width = ids.shape[1]
        with only(self.model, self.config), self.precision():
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=self.config)
        responses = []
        for row in out[:, width:].tolist():
            end = next((t for t, tid in enumerate(row) if tid in self.stops), None)
            responses.append(row if end is None else row[: end + 1])
        return responses


@dataclasses.dataclass
class Step:
    """One generated attempt: the sample PPO trains on."""

    prompt: list[int]
    response: list[int]
    reward: float
    done: bool  # the episode terminated here (d_t = 1): it ended and was not truncated
    truncated: bool  # cut at the step limit (GeneralPoints: the ungraded step after the last failure)
    outcome: str
    finished: bool  # the episode ended here, terminated or truncated
    success: bool = False  # ... and solved its example (`Episode.success`)


def rollout(envs: Envs, generate: Generator, rounds: int) -> tuple[list[Step], list[list[int]]]:
    """`rounds` rounds of one batched generate over every environment; returns the steps
    in round-major order (index t*E + e) and each environment's next prompt, s_T."""
    steps = []
    for _ in range(rounds):
        prompts = [generate.prompt_ids(m) for m in envs.conversations()]
        for e, (prompt, response) in enumerate(zip(prompts, generate(prompts))):
            score, finished, success = envs.step(e, generate.text(response))
            # the episode decides when it ends (GeneralPoints: at success, or truncated at the step limit)
            steps.append(Step(prompt, response, score.reward, finished and not score.truncated, score.truncated, score.outcome, finished, finished and success))
    return steps, [generate.prompt_ids(m) for m in envs.conversations()]


def success_rate(steps: list[Step]) -> float | None:
    """Solved episodes over finished ones among `steps` (rl_log's `success_rate`), None if none finished."""
    finished = sum(s.finished for s in steps)
    return sum(s.success for s in steps) / finished if finished else None
