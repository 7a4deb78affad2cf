"""The benchmark interface (tasks/benchmark.py): no stage knows GeneralPoints, and a second
task runs through the stages' task-specific paths on the interface alone.

`Echo` is a throwaway task (say the number you are shown; OOD shows it in words): if a stage
still called GeneralPoints directly, its tables would hold hands, not Echo's examples.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import polars as pl
import pytest

from rlheal.config import parse_config
from rlheal.store import Store
from tasks import benchmark, data, eval, model, pretrain, report, rl
from tasks.benchmark import Benchmark
from tasks.edit import sweep
from tasks.model import build_tokenizer
from tasks.rl import grpo
from tasks.rl.rollout import Envs, rollout, success_rate
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
        self.example, self.verify_iter, self.scores, self.responses = example, verify_iter, [], []
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
        self.responses.append(response)
        s = Echo().score(response, self.example, "exact")
        if s.reward != 1.0:
            self._messages.append({"role": "user", "content": "No."})
        self.scores.append(s)
        return s


class Echo:
    name = "echo"
    splits = ("id", "ood")
    report_metrics = ()
    corpus_version = "0"
    action_key = '"echo":'
    outcomes = ("right", "wrong", "silent")
    modes = ("exact", "reference")  # reference: surrounding spaces forgiven
    attempt_schema = {"said": pl.String}
    column_types = {"value": pl.Int16}

    def check(self, cfg):
        pass

    def deal(self, split, seed, index):
        return Number(split, index, (seed * 31 + index * 7) % 10)

    def overlap_key(self, e, overlap):
        return (e.split, e.value)

    def identity(self, e):
        return e.value

    def prompt(self, e):
        return f"Say {e.value if e.split == 'id' else WORDS[e.value]}."

    def sft_rows(self, e, cfg):
        return [{"index": e.index, "value": e.value, "prompt": [{"role": "user", "content": self.prompt(e)}], "completion": [{"role": "assistant", "content": str(e.value)}]}]

    def eval_row(self, e, cfg):
        return {"split": e.split, "index": e.index, "value": e.value, "prompt": self.prompt(e), "answer": str(e.value), "target": str(e.value)}

    def from_row(self, row):
        return Number(row["split"], row["index"], row["value"])

    def episode(self, e, mode, verify_iter, rl=False):
        return EchoEpisode(e, verify_iter)

    def score(self, response, e, mode):
        text = response.strip() if mode == "reference" else response
        if not text:
            return Said(-1.0, "silent", "nothing said", True)
        ok = text == str(e.value)
        return Said(1.0 if ok else 0.0, "right" if ok else "wrong", "right" if ok else "wrong number", False, said=text)

    def solves(self, s):
        return s.reward == 1.0

    def solved_rows(self):
        return pl.col("reward") == 1.0

    def rescore(self, ep, mode):
        responses = [m["content"] for m in ep.messages() if m["role"] == "assistant"]
        return [self.score(r, ep.example, mode).reward for r in responses]

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


TASK_PACKAGES = sorted({target.split(":")[0].rsplit(".", 1)[0] for target in benchmark.TASKS.values()})


def test_no_stage_imports_a_task_package():
    """Only the task packages themselves and the interface's registry name a task."""
    assert TASK_PACKAGES == ["tasks.generalpoints", "tasks.virl"]
    offenders = []
    for path in sorted([*(ROOT / "tasks").rglob("*.py"), *(ROOT / "flows").rglob("*.py"), *(ROOT / "rlheal").rglob("*.py")]):
        rel = path.relative_to(ROOT)
        own = next((pkg for pkg in TASK_PACKAGES if rel.parts[:2] == tuple(pkg.split("."))), None)
        if rel == Path("tasks/benchmark.py"):
            continue
        hits = sorted(n for n in _imports(path) for pkg in TASK_PACKAGES if pkg != own and (n == pkg or n.startswith(pkg + ".")))
        if hits:
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
    assert bench.splits == ("id", "ood") and bench.modes == ("exact", "reference")  # point 3 of the protocol


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
    attempts = eval.attempts_table(echo, played, "c", "id", "reference")
    assert attempts.columns[5] == "said" and attempts.schema == pl.Schema(eval.attempts_schema(echo))
    assert attempts["reward"].to_list() == [1.0, 0.0, 0.0, 1.0, -1.0, 1.0, 0.0, 0.0, 0.0]
    assert attempts["reward_other_mode"].to_list()[2] == 1.0  # " 1 " is right in reference mode
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


class Scripted:
    """A rollout generator double: a response per environment, by the example it shows."""

    def __init__(self, answer):
        self.answer = answer

    def prompt_ids(self, messages):
        return [hash(m["content"]) % 97 for m in messages]

    def text(self, response):
        return response[0]

    def __call__(self, prompts):
        return [[a] for a in self.current]


def test_ppo_steps_end_where_the_episode_ends_not_at_a_reward_value(echo):
    """Echo's success reward is 1, and a twice-wrong episode ends unsolved, untruncated: PPO's
    terminal flag and success count follow the episode."""
    stream = lambda i: benchmark.training_stream(echo, 5, set(), "ordered", i)  # noqa: E731
    envs = Envs(echo, 2, stream, 5, "exact", 2)
    gen = Scripted(None)
    gen.current = [str(envs.episodes[0].example.value), "wrong"]
    first, _ = rollout(envs, gen, 1)
    gen.current = [str(envs.episodes[0].example.value), "still wrong"]
    second, _ = rollout(envs, gen, 1)
    a, b = first
    assert (a.reward, a.done, a.finished, a.success) == (1.0, True, True, True)
    assert (b.done, b.finished) == (False, False)
    c, d = second
    assert (d.reward, d.done, d.finished, d.success, d.truncated) == (0.0, True, True, False, False)
    assert success_rate(first + second) == pytest.approx(2 / 3)  # a and c solved, d ended unsolved


def test_grpo_reward_scores_by_the_tasks_examples_and_its_solved_rule(echo):
    reward = grpo.Reward(echo, "exact", "binary")
    reward.examples = {3: Number("id", 3, 4), 8: Number("id", 8, 9)}
    assert reward(None, [[{"content": "4"}], "2", ""], index=[3, 8, 8]) == [1.0, 0.0, 0.0]
    table = grpo.Reward(echo, "exact", "table")
    table.examples = reward.examples
    assert table(None, ["4", "2", ""], index=[3, 8, 8]) == [1.0, 0.0, -1.0]
    forgiving = grpo.Reward(echo, "reference", "binary")
    forgiving.examples = reward.examples
    assert forgiving(None, [" 4 "], index=[3]) == [1.0] and reward(None, [" 4 "], index=[3]) == [0.0]
    assert reward.take()[0]["correct"] == [True, False, False]


def test_the_report_counts_an_example_solved_by_the_tasks_rule(echo):
    """Solved = some attempt of the episode has the task's success reward (b solves hand 1 on
    its second attempt); the other split's rows do not count."""
    attempts = pl.DataFrame({
        "ckpt_id": ["a", "a", "b", "b", "b", "a"], "split": ["ood"] * 5 + ["id"], "hand_index": [0, 1, 0, 1, 1, 1],
        "attempt": [1, 1, 1, 1, 2, 1], "reward": [1.0, 0.0, 0.0, 0.0, 1.0, 1.0],
    })  # fmt: skip
    hands, ids, solved = report.solved_matrix(attempts, "ood", ["a", "b"], echo)
    assert list(hands) == [0, 1] and solved.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_the_tiny_vocabulary_is_the_tasks():
    tok = build_tokenizer(Echo())
    ids = tok("Say seven.")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[:2] == ["Say ", "seven"] and tok.decode(ids) == "Say seven."
    assert "Say " not in build_tokenizer(GP).get_vocab()


def test_every_key_that_depends_on_the_task_names_it(monkeypatch):
    """A study of another task must not find this task's artifacts: each stage's key holds `task`."""
    real = benchmark.of
    monkeypatch.setattr(benchmark, "of", lambda c: Echo() if c.task == "echo" else real(c))
    gp = cfg()
    other = gp.model_copy(update={"task": "echo"})  # a second task, past the Literal
    ckpt = {"ckpt_id": "sft-1", "stage": "sft", "step": 1, "content_hash": "h"}
    for name, key in {
        "data": lambda c: data.key_config(c),
        "model": lambda c: model.key_config(c),
        "pretrain": lambda c: pretrain.key_config(c),
        "eval": lambda c: eval.key_config(c, ckpt, "id", "hash"),
        "rl": lambda c: rl.key_config(c, ckpt),
        "edit": lambda c: sweep.key_config(c, {"variant_id": "v", "method": "none", "reference_compat": False}, ckpt, None, {"id": "hash"}),
    }.items():
        assert key(gp) != key(other), name


def test_replicates_of_different_tasks_are_refused(tmp_path):
    from flows.replicates import ReplicateError, compare

    dirs = {}
    for name, task in (("a", "generalpoints"), ("b", "echo")):
        (tmp_path / name / "tables").mkdir(parents=True)
        pl.DataFrame({"x": [1]}).write_parquet(tmp_path / name / "tables" / "eval_summary.parquet")
        (tmp_path / name / "config.json").write_text(json.dumps({"task": task}))
        dirs[name] = tmp_path / name / "tables"
    with pytest.raises(ReplicateError, match="different tasks .*a: generalpoints, b: echo"):
        compare(dirs, tmp_path / "out")
    assert not (tmp_path / "out").exists()
