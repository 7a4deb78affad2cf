"""The bad-input table of docs/faults.md: exit status 2, a message naming the field or
file, and nothing written; and a disk that fills up during a run: exit status 3, a message
naming the store and the space needed, the half-written artifact gone."""

import errno
import re
import shutil

import pytest
import yaml

from tests.conftest import ROOT, copy_study
from tests.faults.conftest import rlheal, write_config

# case -> (change to the smoke config, or the file's whole text; special handling; what stderr must match)
CASES = {
    "malformed-yaml": ("name: s\ndata: [1, 2\n", None, r"malformed YAML at line \d+"),
    "not-utf8-config": (b"name: s\nstore: \xff\xfe\n", None, r"not a UTF-8 text file"),
    "unknown-key": ({"data": {"eval_sise": 10}}, None, r"data\.eval_sise"),
    "wrong-type": ({"data": {"eval_size": "many"}}, None, r"data\.eval_size"),
    "negative-step": ({"sft": {"save_steps": [0, -5]}}, None, r"sft\.save_steps\[1\]: must be >= 0"),
    "non-increasing-steps": ({"sft": {"save_steps": [0, 10, 40, 40]}}, None, r"sft\.save_steps\[3\]: must be greater than 40"),
    "k-at-rank": ({"svd": {"k": [64]}}, None, r"svd\.k\[0\]: k = 64 is not below min\(m, n\)"),
    "pattern-matches-nothing": ({"svd": {"include": [r".*attention\.wq\.weight"]}}, None, r"svd\.include\[0\]: pattern .* matches no tensor"),
    "missing-model": ({"model": {"builtin": None, "name_or_path": "/nowhere/model"}}, None, r"model\.name_or_path: '/nowhere/model'"),
    "validate-not-a-model": ({"model": {"builtin": None, "name_or_path": "/etc/passwd"}}, "validate", r"model\.name_or_path: '/etc/passwd' is neither a directory nor a model"),
    "unreadable-store": ({}, "store-under-file", r"store is not writable"),
    "validate-unwritable-store": ({}, "validate --store /proc/forbidden", r"/proc/forbidden: store is not writable"),
    "too-little-space": ({}, "free space 5 MB", r"/store: the store's filesystem has 5 MB free, and study 'smoke' needs about [\d.]+ MB there"),
    "config-changed-mid-study": ({"sft": {"learning_rate": 0.5}}, "after-a-run", r"sft\.learning_rate: 0\.001 -> 0\.5"),
    "bad-override": ({}, "--set eval.batch_size=0", r"with --set eval\.batch_size=0: invalid study config\neval\.batch_size: Input should be greater than or equal to 1"),
}
# exit status 3, and something was written (the stages that finished): a test of its own
MID_RUN = ("disk-full-mid-run",)


def test_docs_table_lists_exactly_these_cases():
    doc = (ROOT / "docs" / "faults.md").read_text()
    rows = re.findall(r"^\| ([a-z0-9-]+) \|", doc, re.M)
    assert set(rows) - {"case"} == set(CASES) | set(MID_RUN)


def _merge(base: dict, change: dict) -> dict:
    out = dict(base)
    for k, v in change.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _files(root):
    return sorted(str(p) for p in root.rglob("*") if "progress" not in p.name)


def _free(nbytes: int):
    real = shutil.disk_usage

    def disk_usage(path):
        u = real(path)
        return type(u)(u.total, u.total - nbytes, nbytes)

    return disk_usage


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, tmp_path, request, monkeypatch, capfd):
    change, special, expected = CASES[case]
    store = tmp_path / "store"
    cfg_file = write_config(tmp_path)
    command = "validate" if special and special.startswith("validate") else "run"
    args = [command, str(cfg_file)]
    if special == "after-a-run":  # the shared finished smoke study, copied; then another learning rate
        study = copy_study(request.getfixturevalue("smoke_study"), tmp_path / "copy")
        store, cfg_file = study.store, study.config
        args = ["run", str(cfg_file)]
        before = _files(store)
        cfg_file.write_text(yaml.safe_dump(_merge(yaml.safe_load(cfg_file.read_text()), change)))
    elif isinstance(change, str):
        cfg_file.write_text(change)
    elif isinstance(change, bytes):
        cfg_file.write_bytes(change)
    else:
        cfg_file.write_text(yaml.safe_dump(_merge(yaml.safe_load(cfg_file.read_text()), change)))
    if special and special.startswith(("--", "validate --")):  # command-line options
        args += special.removeprefix("validate ").split(" ", 1)
    if special == "store-under-file":
        (tmp_path / "blocker").write_text("a file")
        args += ["--store", str(tmp_path / "blocker" / "store")]
    if special and special.startswith("free space"):
        # shutil.disk_usage says 5 MB are free (the smoke study needs ~12): in this process
        from flows import cli

        monkeypatch.setattr(shutil, "disk_usage", _free(5_000_000))
        code = cli.main(args)
        out, err = capfd.readouterr()
        assert code == 2, out[-1500:] + err[-1500:]
        assert re.search(r"^  total +[\d.]+ MB", out, re.M), out  # the estimate was printed first
        stderr = err
    else:
        r = rlheal(args, request.getfixturevalue("cli_env"))
        assert r.returncode == 2, r.stdout[-1500:] + r.stderr[-1500:]
        stderr = r.stderr
    assert re.search(expected, stderr), stderr
    if special == "after-a-run":
        assert _files(store) == before
    else:
        assert not store.exists()


def _no_space_left(kind: str):
    """A stage writer that writes half a file, then fails as a full disk makes it fail."""
    from safetensors import SafetensorError

    def write(out, *args, **kwargs):  # (out, cfg) of model.build, (df, path) of write_parquet
        out = args[0] if kind == "oserror" else out
        half = out / "model.safetensors" if out.is_dir() else out
        half.write_bytes(b"\0" * 1000)
        if kind == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", str(half))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return write


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_disk_full_mid_run(kind, tmp_path, prefect_api, monkeypatch, capfd):
    """disk-full-mid-run: the data stage's Parquet write fails with ENOSPC, or the model stage's
    safetensors write with safetensors' own error; `rlheal run` ends with exit 3 and one
    message naming the store and the space the study still needs, the data stage (finished
    first) is kept and the failed stage's half-written folder is gone."""
    from flows import cli
    from tasks import data, model

    if kind == "oserror":
        monkeypatch.setattr(data, "write_parquet", _no_space_left(kind))
    else:
        monkeypatch.setattr(model, "build", _no_space_left(kind))  # the stage's, not preflight's build_tiny
    store = tmp_path / "store"
    code = cli.main(["run", str(write_config(tmp_path))])
    out, err = capfd.readouterr()
    assert code == 3, out[-2000:] + err[-2000:]
    message = err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"rlheal: error: the store {re.escape(str(store))} ran out of disk space \(.*No space left on device.*\): its filesystem has "
        r"[\d.]+ [kMGT]?B free, and study 'smoke' needs about [\d.]+ MB more there \([\d.]+ MB in all, at its peak\)\. "
        r"Finished artifacts are kept .* run the same command again to resume\.",
        message,
    ), message
    failed = "data" if kind == "oserror" else "model"
    leftovers = [p for p in (store / failed).rglob("*") if p.is_file() and ".locks" not in p.parts]
    assert leftovers == [], leftovers  # the temp build of the failed artifact was removed
    if kind == "safetensors":  # the stage before it is sealed and kept for the resume
        (data_dir,) = [p for p in (store / "data").iterdir() if not p.name.startswith(".")]
        assert (data_dir / "manifest.json").is_file()


def test_a_failure_that_is_not_a_full_disk_still_exits_1(tmp_path, prefect_api, monkeypatch, capfd):
    """The full-disk message is not every failure's: a stage that fails otherwise ends as before."""
    from flows import cli
    from tasks import model

    def broken(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # torch's write failure, on a disk with room

    monkeypatch.setattr(model, "build", broken)
    code = cli.main(["run", str(write_config(tmp_path))])
    out, err = capfd.readouterr()
    assert code == 1, out[-2000:] + err[-2000:]
    assert "ran out of disk space" not in err and "did not complete" in err
