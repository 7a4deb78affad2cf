"""The bad-input table of docs/faults.md: exit status 2, a message naming the field or
file, and nothing written."""

import re

import pytest
import yaml

from tests.conftest import ROOT
from tests.faults.conftest import rlheal, write_config

CASES = {
    "malformed-yaml": ("text", "name: s\ndata: [1, 2\n", r"malformed YAML at line \d+"),
    "unknown-key": ({"data": {"eval_sise": 10}}, None, r"data\.eval_sise"),
    "wrong-type": ({"data": {"eval_size": "many"}}, None, r"data\.eval_size"),
    "negative-step": ({"sft": {"save_steps": [0, -5]}}, None, r"sft\.save_steps\[1\]: must be >= 0"),
    "non-increasing-steps": ({"sft": {"save_steps": [0, 10, 40, 40]}}, None, r"sft\.save_steps\[3\]: must be greater than 40"),
    "k-at-rank": ({"svd": {"k": [64]}}, None, r"svd\.k\[0\]: k = 64 is not below min\(m, n\)"),
    "pattern-matches-nothing": ({"svd": {"include": [r".*attention\.wq\.weight"]}}, None, r"svd\.include\[0\]: pattern .* matches no tensor"),
    "missing-model": ({"model": {"builtin": None, "name_or_path": "/nowhere/model"}}, None, r"model\.name_or_path: '/nowhere/model'"),
    "unreadable-store": ({}, "store-under-file", r"store is not writable"),
    "config-changed-mid-study": ({"sft": {"learning_rate": 0.5}}, "after-a-run", r"sft\.learning_rate: 0\.001 -> 0\.5"),
    "bad-override": ({}, "--set eval.batch_size=0", r"with --set eval\.batch_size=0: invalid study config\neval\.batch_size: Input should be greater than or equal to 1"),
}


def test_docs_table_lists_exactly_these_cases():
    doc = (ROOT / "docs" / "faults.md").read_text()
    rows = re.findall(r"^\| ([a-z-]+) \|", doc, re.M)
    assert set(rows) - {"case"} == set(CASES)


def _merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for k, v in change.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tmp_path, cli_env):
    change, special, expected = CASES[case]
    store = tmp_path / "store"
    cfg_file = write_config(tmp_path)
    args = ["run", str(cfg_file)]
    if special == "after-a-run":
        cfg_file.write_text(yaml.safe_dump({**yaml.safe_load(cfg_file.read_text()), "data": {"train_size": 64, "eval_size": 2}, "sft": {"save_steps": [0, 1], "batch_size": 8, "per_device_batch_size": 8, "learning_rate": 0.001}}))
        assert rlheal(args, cli_env).returncode == 0
        before = sorted(str(p) for p in store.rglob("*") if "progress" not in p.name)
        cfg_file.write_text(yaml.safe_dump(_merge(yaml.safe_load(cfg_file.read_text()), change)))
    elif change == "text":
        cfg_file.write_text(special)
    else:
        cfg_file.write_text(yaml.safe_dump(_merge(yaml.safe_load(cfg_file.read_text()), change)))
    if special and special.startswith("--set "):
        args += special.split(" ", 1)
    if special == "store-under-file":
        (tmp_path / "blocker").write_text("a file")
        store = tmp_path / "blocker" / "store"
        args += ["--store", str(store)]
    r = rlheal(args, cli_env)
    assert r.returncode == 2, r.stdout[-1500:] + r.stderr[-1500:]
    assert re.search(expected, r.stderr), r.stderr
    if special == "after-a-run":
        assert sorted(str(p) for p in store.rglob("*") if "progress" not in p.name) == before
    else:
        assert not store.exists()
