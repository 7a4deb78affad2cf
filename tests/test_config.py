"""The study config: defaults, relations, and error messages that name the field."""

import subprocess
import sys

import pytest
import yaml

from rlheal.config import ConfigError, load_config, parse_config
from tests.conftest import CONFIGS


def write(tmp_path, data, name="study.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def error_of(data) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, "x.yaml")
    return str(e.value)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.name


def test_defaults_live_in_the_model():
    cfg = parse_config({"name": "s"})
    assert cfg.model.builtin == "tiny" and cfg.data.eval_size == 234 and cfg.data.eval_seed == 42
    assert (cfg.sft.adam_beta1, cfg.sft.adam_beta2, cfg.sft.adam_epsilon) == (0.9, 0.98, 1e-7)
    assert cfg.verifier.mode == "exact" and cfg.verifier.verify_iter == 5


def test_non_increasing_steps_name_the_index():
    msg = error_of({"name": "s", "sft": {"save_steps": [0, 10, 40, 40]}})
    assert "sft.save_steps[3]: must be greater than 40" in msg
    msg = error_of({"name": "s", "sft": {"save_steps": [0, -5]}})
    assert "sft.save_steps[1]: must be >= 0" in msg


def test_unknown_key_is_rejected_with_its_path():
    msg = error_of({"name": "s", "data": {"eval_sise": 10}})
    assert "data.eval_sise: Extra inputs are not permitted" in msg


def test_wrong_type_and_range():
    assert "data.eval_size" in error_of({"name": "s", "data": {"eval_size": "many"}})
    assert "data.eval_size" in error_of({"name": "s", "data": {"eval_size": 0}})
    assert "verifier.mode" in error_of({"name": "s", "verifier": {"mode": "float"}})


def test_relations_are_checked():
    assert "data.train_seed: must differ from eval_seed" in error_of({"name": "s", "data": {"train_seed": 42}})
    msg = error_of({"name": "s", "data": {"train_size": 100}, "sft": {"save_steps": [0, 10]}})
    assert "data.train_size" in msg and "needs 640" in msg
    assert "model" in error_of({"name": "s", "model": {"builtin": "tiny", "name_or_path": "x"}})
    assert "model.tiny.hidden_size" in error_of({"name": "s", "model": {"builtin": "tiny", "tiny": {"hidden_size": 30}}})


def test_file_errors_name_the_file(tmp_path):
    bad = write(tmp_path, "name: s\ndata: [1, 2\n", "broken.yaml")
    with pytest.raises(ConfigError, match=r"broken.yaml: malformed YAML at line \d+"):
        load_config(bad)
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n"))


def rlheal(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "rlheal.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_cli_validate(tmp_path):
    ok = rlheal("validate", str(CONFIGS / "smoke.yaml"))
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = rlheal("validate", str(write(tmp_path, {"name": "s", "sft": {"save_steps": [0, 20, 10]}})))
    assert bad.returncode == 2
    assert "sft.save_steps[2]: must be greater than 20" in bad.stderr


def test_cli_run_with_bad_input_writes_nothing(tmp_path):
    store = tmp_path / "store"
    cfg = write(tmp_path, {"name": "s", "store": str(store), "data": {"eval_size": -1}})
    r = rlheal("run", str(cfg))
    assert r.returncode == 2 and "data.eval_size" in r.stderr
    assert not store.exists()
    r = rlheal("run", str(tmp_path / "missing.yaml"), "--store", str(store))
    assert r.returncode == 2 and "missing.yaml" in r.stderr
    assert not store.exists()


def test_cli_run_with_unwritable_store(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = rlheal("run", str(CONFIGS / "smoke.yaml"), "--store", str(blocker / "store"))
    assert r.returncode == 2 and "store is not writable" in r.stderr


def test_overrides_are_validated_like_the_file(tmp_path):
    path = CONFIGS / "toy.yaml"
    cfg = load_config(path, overrides=["name=toy-seed1", "data.train_seed=1", "rl.ppo.learning_rate=5e-5", "sft.save_steps=[0, 4, 8]", "rl.from_steps=[4, 8]"])
    assert (cfg.name, cfg.data.train_seed, cfg.rl.ppo.learning_rate, cfg.sft.save_steps, cfg.rl.from_steps) == ("toy-seed1", 1, 5e-5, [0, 4, 8], [4, 8])
    assert load_config(path) == load_config(path, overrides=[])  # the file itself is untouched
    with pytest.raises(ConfigError, match=r"with --set sft.learning_rat=1: invalid study config\nsft.learning_rat: Extra inputs"):
        load_config(path, overrides=["sft.learning_rat=1"])
    with pytest.raises(ConfigError, match=r"data.train_seed: must differ from eval_seed"):
        load_config(path, overrides=["data.train_seed=42"])
    with pytest.raises(ConfigError, match=r"--set 'sft.learning_rate': expected FIELD=VALUE"):
        load_config(path, overrides=["sft.learning_rate"])
    with pytest.raises(ConfigError, match=r"--set name.x: name is not a section"):
        load_config(path, overrides=["name.x=3"])


def test_cli_set_bad_value_exits_2_naming_the_field(tmp_path):
    r = rlheal("run", str(CONFIGS / "smoke.yaml"), "--store", str(tmp_path / "store"), "--set", "eval.batch_size=0")
    assert r.returncode == 2 and "eval.batch_size" in r.stderr
    assert not (tmp_path / "store").exists()
