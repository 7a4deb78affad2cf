"""Safety: model text is never executed, weights load only from safetensors, remote code
stays off, the server binds to loopback, and secrets never reach the store."""

import random
import re
import string

import pytest

from tasks.generalpoints import deal, score
from tests.conftest import ROOT
from tests.faults.conftest import copy_study, rlheal, write_config

SOURCE = [p for d in ("tasks", "flows", "rlheal") for p in (ROOT / d).rglob("*.py")]


@pytest.mark.parametrize(
    "pattern, why",
    [
        (r"(?<![\w.])(eval|exec|compile)\(", "eval/exec/compile on text"),
        (r"\bimport ast\b|\bast\.(parse|literal_eval)", "ast parsing of text"),
        (r"torch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True"),
        (r"trust_remote_code=True", "trust_remote_code hard-coded on"),
        (r"pickle\.loads?\(", "unpickling"),
    ],
)
def test_source_tree_has_no(pattern, why):
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in SOURCE for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not hits, f"{why}: {hits}"


def hostile_strings(n: int, seed: int = 0):
    rng = random.Random(seed)
    payloads = [
        '__import__("os").system("touch PWNED")', "().__class__.__bases__[0].__subclasses__()", "open('/etc/passwd').read()",
        "exec('1')", "lambda: 0", "9" * 5000, "(" * 10_000 + "1", "1" + "+1" * 3_000, "٤*٦*١*١", "４*6*1*1", "1e309*24",
        "\x00\x01\x02", "{" * 1000, '{"formula": {"formula": []}}', '"formula": "' + "(" * 300 + '"', "24//1", "2**5-8",
    ]
    alphabet = string.printable + "×÷²٤４\u202e\ufeff"
    for i in range(n):
        kind = i % 4
        if kind == 0:
            body = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        elif kind == 1:
            body = rng.choice(payloads)
        elif kind == 2:
            body = "".join(rng.choice("0123456789+-*/()= ") for _ in range(rng.randint(0, 40)))
        else:
            body = rng.choice(payloads) + "".join(rng.choice("+-*/()") for _ in range(rng.randint(0, 5)))
        yield rng.choice([body, f'{{\n  "formula": "{body}",\n}}', f'{{"formula": {body!r}}}', f'"formula": "{body}" and more'])


def test_verifier_fuzz_100k_hostile_strings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hands = [deal(s, 5, i) for s in ("id", "ood") for i in range(50)]
    seen = set()
    for i, text in enumerate(hostile_strings(100_000)):
        s = score(text, hands[i % len(hands)], mode="exact" if i % 2 else "reference")
        assert s.reward in (5.0, 1.0, 0.0) or s.reward <= -1.0
        seen.add(s.outcome)
    assert not (tmp_path / "PWNED").exists()
    assert {"illegal_formula", "incorrect_number", "aggregated_error"} <= seen


def test_server_binds_to_loopback_only():
    make = (ROOT / "Makefile").read_text()
    line = next(l for l in make.splitlines() if "prefect server start" in l)
    assert "--host 127.0.0.1" in line


@pytest.mark.parametrize("begin", [
    "thin",  # a copy of the finished study with one task of every stage left to run under the secret
    pytest.param("empty", marks=pytest.mark.integration),  # every task of the study runs under it
])
def test_no_token_reaches_logs_tables_or_artifacts(tmp_path, cli_env, smoke_study, begin):
    secret = "hf_SECRET_" + "x7" * 12
    env = {**cli_env, "HF_TOKEN": secret, "HUGGING_FACE_HUB_TOKEN": secret, "PREFECT_API_KEY": secret}
    cfg = copy_study(smoke_study, tmp_path, thin=True).config if begin == "thin" else write_config(tmp_path)
    r = rlheal(["run", str(cfg), "-v"], env)  # -v: every log line is scanned too
    assert r.returncode == 0
    if begin == "thin":  # it did run a task of every stage
        assert "built tiny model" in r.stdout + r.stderr and "eval rl-4-2 id: accuracy" in r.stdout + r.stderr
    assert secret not in r.stdout + r.stderr
    for f in (tmp_path / "store").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
