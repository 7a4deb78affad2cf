"""The artifact store: sealed or absent, damage detected and rebuilt, one build under contention."""

import json
import multiprocessing as mp
import os
import time

import datasets
import polars as pl
import pytest

from rlheal.store import MANIFEST, Store, write_parquet


def make_table(n=10):
    return pl.DataFrame({"i": list(range(n)), "sq": [i * i for i in range(n)]})


def builder(calls):
    def build(tmp):
        calls.append(tmp)
        write_parquet(make_table(), tmp / "t.parquet")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "blob.bin").write_bytes(os.urandom(4096))
        return {"rows": 10}

    return build


def test_key_depends_on_config_inputs_and_version(tmp_path):
    s = Store(tmp_path)
    a = s.artifact("data", {"x": 1, "y": [1, 2]})
    assert a == s.artifact("data", {"y": [1, 2], "x": 1})  # key order is irrelevant
    assert a.key != s.artifact("data", {"x": 2, "y": [1, 2]}).key
    assert a.key != s.artifact("data", {"x": 1, "y": [1, 2]}, inputs=["sft-abc"]).key
    assert a.key != s.artifact("data", {"x": 1, "y": [1, 2]}, version="2").key
    assert a.path == tmp_path / "data" / a.key


def test_build_seals_once(tmp_path):
    s, calls = Store(tmp_path), []
    art = s.artifact("data", {"x": 1})
    path = s.build(art, builder(calls), config={"x": 1})
    assert path == art.path and s.is_sealed(art)
    m = json.loads((path / MANIFEST).read_text())
    assert set(m["files"]) == {"t.parquet", "sub/blob.bin"} and m["rows"] == 10 and m["config"] == {"x": 1}
    s.build(art, builder(calls))
    assert len(calls) == 1
    assert not list((tmp_path / "data" / ".tmp").iterdir())


def test_failed_build_leaves_nothing(tmp_path):
    s = Store(tmp_path)
    art = s.artifact("data", {})

    def boom(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        s.build(art, boom)
    assert not art.path.exists() and s.problem(art) == "missing"
    assert not list((tmp_path / "data" / ".tmp").iterdir())


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-7])


def _flip(p):
    b = bytearray(p.read_bytes())
    b[100] ^= 0xFF
    p.write_bytes(bytes(b))


def _rewrite_manifest_checksum(p):
    m = json.loads((p.parent.parent / MANIFEST).read_text())
    m["files"]["sub/blob.bin"]["sha256"] = "0" * 64
    (p.parent.parent / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda a: _truncate(a / "t.parquet"), "size of t.parquet"),
        (lambda a: _flip(a / "sub" / "blob.bin"), "checksum of sub/blob.bin"),
        (lambda a: _rewrite_manifest_checksum(a / "sub" / "blob.bin"), "checksum of sub/blob.bin"),
        (lambda a: (a / "sub" / "blob.bin").unlink(), "missing file sub/blob.bin"),
        (lambda a: (a / MANIFEST).unlink(), "no manifest"),
    ],
    ids=["truncated", "bitflip", "manifest-checksum", "missing-file", "no-manifest"],
)
def test_damage_is_detected_logged_and_rebuilt(tmp_path, damage, expected, caplog):
    calls = []
    art = Store(tmp_path).artifact("data", {})
    Store(tmp_path).build(art, builder(calls))
    damage(art.path)
    fresh = Store(tmp_path)  # a new process: nothing memoised
    assert expected in fresh.problem(art)
    with caplog.at_level("WARNING", logger="rlheal.store"):
        fresh.build(art, builder(calls))
    assert len(calls) == 2 and fresh.is_sealed(art)
    assert "is damaged" in caplog.text and expected in caplog.text


def _racer(root, out):
    s = Store(root)
    art = s.artifact("data", {"race": True})

    def slow(tmp):
        with open(out, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        write_parquet(make_table(), tmp / "t.parquet")

    s.build(art, slow)


def test_two_processes_build_once(tmp_path):
    out = tmp_path / "log.txt"
    ps = [mp.get_context("spawn").Process(target=_racer, args=(tmp_path / "store", out)) for _ in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join(60)
    assert [p.exitcode for p in ps] == [0, 0]
    assert out.read_text().count("built") == 1


def test_study_tables_readable_by_polars_and_datasets(tmp_path):
    s = Store(tmp_path)
    art = s.artifact("data", {})
    s.build(art, builder([]))
    link = s.publish("study1", "t", art.path / "t.parquet")
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert s.table("study1", "t").select(pl.col("sq").sum()).collect().item() == 285
    ds = datasets.Dataset.from_parquet(str(link))
    assert ds.num_rows == 10 and ds[3]["sq"] == 9


def test_a_study_config_changes_only_where_both_versions_have_the_field(tmp_path):
    """A study is refused another config, but not a newer rlheal's own schema: a field that
    moved into a section (`sft.lora` -> `sft.lora.enabled`) or a new section is on one side only."""
    from rlheal.store import StoreError

    s = Store(tmp_path)
    s.claim_study("toy", {"sft": {"learning_rate": 3e-4, "lora": False, "lora_r": 64}})
    s.check_claim("toy", {"sft": {"learning_rate": 3e-4, "lora": {"enabled": False, "r": 64}}, "rl": {"grpo": {"decoding": {}}}})
    with pytest.raises(StoreError, match=r"sft.learning_rate: 0.0003 -> 0.001"):
        s.check_claim("toy", {"sft": {"learning_rate": 1e-3, "lora": {"enabled": False}}})
    s.check_claim("toy", {"sft": {"learning_rate": 1e-3}}, force=True)


def test_a_claim_under_a_renamed_section_is_compared_under_its_new_name(tmp_path):
    """issue 16 renamed `editing` to `edit`: a study claimed before, with another grid, is
    still refused (were the names compared as they are, the section would be on one side only)."""
    from rlheal.store import StoreError

    s = Store(tmp_path)
    s.claim_study("toy", {"editing": {"grid": "small", "enabled": True}})
    s.check_claim("toy", {"edit": {"grid": "small", "enabled": True}})
    with pytest.raises(StoreError, match=r"edit.grid: 'small' -> 'default'"):
        s.check_claim("toy", {"edit": {"grid": "default", "enabled": True}})
    # a claim from before `task` existed is a GeneralPoints study
    s.check_claim("toy", {"task": "generalpoints", "edit": {"grid": "small", "enabled": True}})
    with pytest.raises(StoreError, match=r"task: 'generalpoints' -> 'virl'"):
        s.check_claim("toy", {"task": "virl", "edit": {"grid": "small", "enabled": True}})


def test_a_stage_key_refuses_a_path_as_an_input(tmp_path):
    """Inputs are artifacts (by id) or content keys `kind:...`: a path would key an artifact by
    where the store lives, and two stores of one study would never share it."""
    from rlheal.caching import Stage

    s, stage = Store(tmp_path), Stage("sft", version="1")
    data = s.artifact("data", {})
    assert stage.artifact(s, {}, [data]).inputs == (data.id,)
    assert stage.artifact(s, {}, ["ckpt:base:abc"]).key != stage.artifact(s, {}, ["ckpt:base:abd"]).key
    with pytest.raises(TypeError, match="an input is an Artifact or a content key"):
        stage.artifact(s, {}, [str(data.path)])
