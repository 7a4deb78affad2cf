"""Damaged artifacts in a finished study are detected, reported and rebuilt, never used."""

import json
from rlheal.store import MANIFEST
from tests.faults.conftest import assert_sealed_or_absent, copy_study, rlheal, study_tables


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _checksum(path):
    manifest = path.parent / MANIFEST
    m = json.loads(manifest.read_text())
    m["files"][path.name]["sha256"] = "f" * 64
    manifest.write_text(json.dumps(m))


DAMAGE = {
    "truncated-safetensors": ("sft/*-s4/model.safetensors", _truncate, "size of model.safetensors"),
    "truncated-parquet": ("data/*/eval_set_ood.parquet", _truncate, "size of eval_set_ood.parquet"),
    "manifest-checksum": ("model/*/model.safetensors", _checksum, "checksum of model.safetensors"),
    "missing-file": ("eval/*/eval_attempts.parquet", lambda p: p.unlink(), "missing file eval_attempts.parquet"),
}


def test_damage_is_detected_and_rebuilt(tmp_path, cli_env, smoke_study):
    """All four kinds of damage in one finished study (a copy of the session's); one re-run
    detects, reports and rebuilds each of them, and ends with the reference tables."""
    reference_store = smoke_study.store
    mine = copy_study(smoke_study, tmp_path)
    cfg, store = mine.config, mine.store
    for pattern, damage, _ in DAMAGE.values():
        damage(sorted(store.glob(pattern))[0])
    r = rlheal(["run", str(cfg)], cli_env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    log = r.stdout + r.stderr
    for case, (_, _, message) in DAMAGE.items():
        assert message in log, case
    assert log.count("rebuilding it") >= len(DAMAGE)
    assert_sealed_or_absent(store)
    ours, ref = study_tables(store), study_tables(reference_store)
    for name in ref:
        assert ours[name].equals(ref[name]), name
