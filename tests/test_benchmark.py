"""The benchmark interface (tasks/benchmark.py): no stage knows GeneralPoints, and a second
task runs through the stages' task-specific paths on the interface alone.

`Echo` is a throwaway task (say the number you are shown; OOD shows it in words): if a stage
still called GeneralPoints directly, its tables would hold hands, not Echo's examples.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import polars as pl
import pytest

from rlheal.config import parse_config
from rlheal.store import Store
from tasks import benchmark, data, eval
from tasks.benchmark import Benchmark
from tasks.rl.rollout import Envs
from tests.conftest import GP

ROOT = Path(__file__).parents[1]
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclasses.dataclass(frozen=True)
class Number:
    split: str
    index: int | None
    value: int


@dataclasses.dataclass(frozen=True)
class Said:
    reward: float
    outcome: str
    reason: str
    format_error: bool
    truncated: bool = False
    said: str = ""


class EchoEpisode:
    def __init__(self, example: Number, verify_iter: int):
        self.example, self.verify_iter, self.scores = example, verify_iter, []
        self._messages = [{"role": "user", "content": Echo().prompt(example)}]

    def messages(self):
        return [dict(m) for m in self._messages]

    @property
    def success(self):
        return bool(self.scores) and self.scores[-1].reward == 1.0

    truncated = False

    @property
    def done(self):
        return self.success or len(self.scores) >= self.verify_iter

    def record(self, response):
        self._messages.append({"role": "assistant", "content": response})
        s = Echo().score(response, self.example, "exact")
        if s.reward != 1.0:
            self._messages.append({"role": "user", "content": "No."})
        self.scores.append(s)
        return s


class Echo:
    name = "echo"
    splits = ("id", "ood")
    outcomes = ("right", "wrong", "silent")
    modes = ("exact", "loose")
    success_reward = 1.0
    attempt_schema = {"said": pl.String}
    column_types = {"value": pl.Int16}

    def deal(self, split, seed, index):
        return Number(split, index, (seed * 31 + index * 7) % 10)

    def overlap_key(self, e, overlap):
        return (e.split, e.value)

    def identity(self, e):
        return e.value

    def prompt(self, e):
        return f"Say {e.value if e.split == 'id' else WORDS[e.value]}."

    def sft_row(self, e, cfg):
        return {"index": e.index, "value": e.value, "prompt": [{"role": "user", "content": self.prompt(e)}], "completion": [{"role": "assistant", "content": str(e.value)}]}

    def eval_row(self, e, cfg):
        return {"split": e.split, "index": e.index, "value": e.value, "prompt": self.prompt(e), "answer": str(e.value), "target": str(e.value)}

    def from_row(self, row):
        return Number(row["split"], row["index"], row["value"])

    def episode(self, e, mode, verify_iter, rl=False):
        return EchoEpisode(e, verify_iter)

    def score(self, response, e, mode):
        text = response.strip() if mode == "loose" else response
        if not text:
            return Said(-1.0, "silent", "nothing said", True)
        ok = text == str(e.value)
        return Said(1.0 if ok else 0.0, "right" if ok else "wrong", "right" if ok else "wrong number", False, said=text)

    def score_columns(self, s):
        return {"said": s.said}

    def summary_metrics(self, n, k, attempts):
        return {"echo_misses": n - k}

    def phrases(self):
        return ["Say ", *WORDS]

    def corpus(self, cfg):
        return pl.DataFrame({"prompt": ["Say one."], "answer": ["1"]})

    def report_columns(self, tables):
        return None

    def paper_reference(self):
        return None


@pytest.fixture
def echo(monkeypatch):
    """Echo as the benchmark every stage gets, whatever the config says."""
    monkeypatch.setattr(benchmark, "of", lambda cfg: Echo())
    return Echo()


def cfg():
    return parse_config({"name": "b", "data": {"train_size": 12, "eval_size": 6}, "sft": {"save_steps": [0, 1], "batch_size": 4, "per_device_batch_size": 4}})


# ---------------------------------------------------------------------------- the contract


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_stage_imports_a_task_package():
    """Only the task packages themselves and the interface's registry name a task."""
    offenders = []
    for path in sorted([*(ROOT / "tasks").rglob("*.py"), *(ROOT / "flows").rglob("*.py"), *(ROOT / "rlheal").rglob("*.py")]):
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("tasks", "generalpoints") or rel == Path("tasks/benchmark.py"):
            continue
        if hits := sorted(n for n in _imports(path) if n == "tasks.generalpoints" or n.startswith("tasks.generalpoints.")):
            offenders.append(f"{rel}: {hits}")
    assert not offenders, offenders


def test_the_scan_sees_an_import(tmp_path):
    """The scan above can fail: it finds both import forms."""
    f = tmp_path / "m.py"
    f.write_text("import tasks.generalpoints.cards\nfrom tasks.generalpoints import deal\n")
    assert {"tasks.generalpoints.cards", "tasks.generalpoints"} <= _imports(f)


@pytest.mark.parametrize("bench", [GP, Echo()], ids=["generalpoints", "echo"])
def test_a_benchmark_has_every_member_of_the_protocol(bench):
    members = [n for n in dir(Benchmark) if not n.startswith("_")] + list(Benchmark.__annotations__)
    missing = [n for n in members if not hasattr(bench, n)]
    assert not missing, missing
    assert bench.splits[0] == "id" and len(bench.modes) == 2 and bench.modes[0] in ("exact",)


def test_generalpoints_rows_round_trip_to_the_dealt_hand():
    c = cfg()
    for split in GP.splits:
        hand = GP.deal(split, 42, 3)
        back = GP.from_row(GP.eval_row(hand, c))
        assert (back.split, back.index, back.cards, back.numbers, back.reference) == (hand.split, 3, hand.cards, hand.numbers, hand.reference)
        ep = GP.episode(back, "exact", 5)
        assert ep.example is back and ep.messages()[0]["content"] == GP.eval_row(hand, c)["prompt"]


def test_the_task_field_names_a_known_task():
    assert parse_config({"name": "t"}).task == "generalpoints"
    with pytest.raises(Exception, match="task"):
        parse_config({"name": "t", "task": "chess"})
    with pytest.raises(ValueError, match="task: unknown task 'chess'"):
        benchmark.get("chess")


# ---------------------------------------------------------------------------- a second task through the stages


def test_the_data_stage_writes_the_tasks_rows(tmp_path, echo):
    out = data.run(Store(tmp_path), cfg())
    train = pl.read_parquet(out / "sft_train.parquet")
    assert train.columns == ["index", "value", "prompt", "completion"] and train.height == 12
    assert train["completion"][0][0]["content"] == str(train["value"][0])
    ood = pl.read_parquet(out / "eval_set_ood.parquet")
    assert ood.schema["value"] == pl.Int16 and ood["prompt"][0].startswith("Say ") and not any(ch.isdigit() for ch in ood["prompt"][0])
    # Echo's overlap key is (split, value): ten ID values, six of them held for evaluation
    held = {v for v in pl.read_parquet(out / "eval_set_id.parquet")["value"]}
    assert not held & set(train["value"])


def test_evaluation_tables_use_the_tasks_scores_and_columns(echo):
    examples = [Number("id", i, i) for i in range(4)]
    answers = {0: ["0"], 1: ["7", " 1 ", "1"], 2: ["", "2"], 3: ["x", "y", "z"]}

    def generate(conversations):
        out = []
        for c in conversations:
            value = int(c[0]["content"].split()[1].rstrip("."))
            out.append(eval.Generation(answers[value][sum(m["role"] == "assistant" for m in c)], 1, False))
        return out

    played = eval.play([echo.episode(e, "exact", 3) for e in examples], generate, batch_size=2)
    attempts = eval.attempts_table(echo, played, "c", "id", "loose")
    assert attempts.columns[5] == "said" and attempts.schema == pl.Schema(eval.attempts_schema(echo))
    assert attempts["reward"].to_list() == [1.0, 0.0, 0.0, 1.0, -1.0, 1.0, 0.0, 0.0, 0.0]
    assert attempts["reward_other_mode"].to_list()[2] == 1.0  # " 1 " is right when stripped
    s = eval.summarize(echo, attempts).row(0, named=True)
    assert (s["n"], s["k"], s["attempts"], s["echo_misses"]) == (4, 3, 9, 1)
    assert (s["rate_right"], s["rate_wrong"], s["rate_silent"]) == pytest.approx((3 / 9, 5 / 9, 1 / 9))


def test_rl_environments_deal_and_restore_the_tasks_examples(echo):
    stream = lambda i: benchmark.training_stream(echo, 5, set(), "ordered", i)  # noqa: E731
    envs = Envs(echo, 2, stream, 5, "exact", 2)
    envs.step(0, "wrong")
    state = envs.state()
    again = Envs(echo, 2, stream, 5, "exact", 2)
    again.restore(state)
    assert [e.example for e in again.episodes] == [e.example for e in envs.episodes]
    assert again.episodes[0].messages() == envs.episodes[0].messages()
