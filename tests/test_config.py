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
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


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


def test_rl_of_zero_updates_is_a_config_error(tmp_path):
    """`rl.save_steps: [0]` used to reach PPO and divide by T_max = 0 in the cosine schedule."""
    assert "rl.save_steps: [0] asks for a run of 0 updates" in error_of({"name": "s", "rl": {"save_steps": [0]}})
    assert "rl.save_steps" in error_of({"name": "s", "rl": {"algorithm": "grpo", "save_steps": [0]}})
    assert parse_config({"name": "s", "rl": {"save_steps": [0], "from_steps": []}}).rl.num_updates == 0  # no RL at all
    r = rlheal("validate", str(write(tmp_path, {"name": "s", "rl": {"save_steps": [0]}})))
    assert r.returncode == 2 and "rl.save_steps" in r.stderr and "Traceback" not in r.stderr


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not a UTF-8 text file \(byte 9"):
        load_config(bad)
    r = rlheal("validate", str(bad))
    assert r.returncode == 2 and "latin1.yaml: not a UTF-8 text file" in r.stderr and "Traceback" not in r.stderr, r.stderr


# training.md §3.5 (coefficients), §3.6 (the "Llama script" / "Qwen script" rows and the "Paper
# presets" bullet), §6 (the authors_rl_* presets); starts: training.md §2.1, §5 and
# paper_results.md §2.3 (F1). Written out from the spec, not read back from the YAML.
AUTHORS_PPO = {
    "epochs": 4, "minibatch_size": None, "clip": 0.1, "value_clip": 0.1, "value_coef": 0.5, "max_grad_norm": 0.01,
    "gamma": 0.9, "lam": 0.95, "learning_rate": 1e-6, "lr_min": 1e-9, "adam_epsilon": 1e-7, "thought_coef": 0.5,
    "cut_gae_at_truncation": False,
}  # fmt: skip
PAPER_RL = {
    "paper-llama3.2-11b.yaml": {
        "per_update": 512, "updates": 100, "save_steps": list(range(0, 101, 5)), "rl_start": 1100,
        "from_steps": [0, 90, 140, *range(200, 1601, 100)],
        "decoding": {"do_sample": True, "temperature": 0.2, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.0, "max_new_tokens": 512},
    },
    "paper-qwen2.5-7b.yaml": {
        "per_update": 128, "updates": 300, "save_steps": [0, 10, 20, 30, 50, 100, 150, 200, 250, 300], "rl_start": 800,
        "from_steps": [800],
        "decoding": {"do_sample": True, "temperature": 0.2, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 512},
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PAPER_RL))
def test_paper_presets_run_the_authors_rl(name):
    cfg, want = load_config(CONFIGS / name), PAPER_RL[name]
    rl, p = cfg.rl, cfg.rl.ppo
    assert (rl.algorithm, rl.seed) == ("ppo", 0)  # their scripts used seed 0
    assert p.num_envs * p.steps_per_env == want["per_update"]
    assert rl.num_updates == want["updates"] and (p.lr_t_max or rl.num_updates) == want["updates"]  # T_max = num_updates
    assert rl.save_steps == want["save_steps"]
    assert {k: v for k, v in rl.decoding.resolved().items() if k not in ("seed", "preset")} == want["decoding"]
    assert {k: getattr(p, k) for k in AUTHORS_PPO} == AUTHORS_PPO
    assert p.compute_dtype == "float32"  # deviation 14 kept (training.md §8)
    assert rl.from_steps == want["from_steps"] and set(rl.from_steps) <= set(cfg.sft.save_steps)
    assert (cfg.roles.rl_start or cfg.sft.save_steps[-1]) == want["rl_start"]  # R: the run of their RL scripts


# ---------------------------------------------------------------- every field described (issue 16 §5)


def test_every_config_field_has_a_description():
    """A field without a description is a defect: `rlheal validate --explain` prints them all."""
    from rlheal.config import explain_fields

    rows = explain_fields()
    assert len(rows) > 150  # every section expanded, not just the top level
    assert "edit.variants[].method" in {path for path, *_ in rows}  # and the entries of a list of sections
    undescribed = [path for path, _, _, doc in rows if not doc.strip()]
    assert not undescribed, f"fields without a description: {undescribed}"


def test_docs_config_md_is_what_validate_explain_prints():
    """docs/config.md is generated; adding or changing a field without regenerating it fails here:
    (head -6 docs/config.md; rlheal validate --explain) > docs/config.md"""
    r = subprocess.run([sys.executable, "-m", "flows.cli", "validate", "--explain"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = (CONFIGS.parent / "docs" / "config.md").read_text()
    assert doc.endswith(r.stdout) and "| `rl.ppo.value_coef` | float | 0.5 |" in r.stdout


def test_validate_without_a_config_asks_for_one():
    r = subprocess.run([sys.executable, "-m", "flows.cli", "validate"], capture_output=True, text=True)
    assert r.returncode == 2 and "name a config file" in r.stderr


def test_choices_are_literals_and_rules_are_validators():
    """TRL's string options are checked when the file is read, not when the trainer starts; a PPO
    update of fewer than 2 samples is a config error naming the field, not a crash in ppo.py."""
    with pytest.raises(ConfigError, match=r"rl.grpo.loss_type"):
        parse_config({"name": "t", "rl": {"grpo": {"loss_type": "daop"}}})
    with pytest.raises(ConfigError, match=r"rl.grpo.scale_rewards"):
        parse_config({"name": "t", "rl": {"grpo": {"scale_rewards": True}}})
    with pytest.raises(ConfigError, match=r"rl.ppo.num_envs: num_envs x steps_per_env must be >= 2"):
        parse_config({"name": "t", "rl": {"ppo": {"num_envs": 1, "steps_per_env": 1}}})
    with pytest.raises(ConfigError, match=r"rl.grpo.decoding.do_sample: GRPO compares sampled completions"):
        parse_config({"name": "t", "rl": {"algorithm": "grpo", "grpo": {"decoding": {"preset": "greedy"}}}})
    # each algorithm's rule binds only when that algorithm runs
    parse_config({"name": "t", "rl": {"algorithm": "grpo", "ppo": {"num_envs": 1, "steps_per_env": 1}}})
    parse_config({"name": "t", "rl": {"grpo": {"decoding": {"preset": "greedy"}}}})


def test_grpo_samples_through_a_decoding_section_with_the_spec_defaults():
    """training.md §4's GRPO defaults, now as a decoding section like every other stage's."""
    d = parse_config({"name": "t"}).rl.grpo.decoding.resolved()
    assert (d["preset"], d["do_sample"], d["temperature"], d["top_p"], d["top_k"], d["repetition_penalty"], d["max_new_tokens"]) == ("grpo_default", True, 1.0, 1.0, 0, 1.0, 256)
    d = parse_config({"name": "t", "rl": {"grpo": {"decoding": {"max_new_tokens": 48}}}}).rl.grpo.decoding.resolved()
    assert (d["preset"], d["temperature"], d["max_new_tokens"]) == ("grpo_default", 1.0, 48)


def test_one_lora_section_for_sft_and_grpo():
    from rlheal.config import LoraSection

    cfg = parse_config({"name": "t", "sft": {"lora": {"enabled": True, "r": 4}}, "rl": {"grpo": {"lora": {"enabled": True, "alpha": 8}}}})
    assert type(cfg.sft.lora) is type(cfg.rl.grpo.lora) is LoraSection
    assert (cfg.sft.lora.r, cfg.sft.lora.alpha, cfg.rl.grpo.lora.r, cfg.rl.grpo.lora.alpha) == (4, 16, 64, 8)
    with pytest.raises(ConfigError, match=r"sft.lora.targets"):
        parse_config({"name": "t", "sft": {"lora": {"targets": []}}})


def test_a_study_is_the_same_study_on_another_runner(tmp_path):
    """The runner decides where and when tasks run, not what they compute (make demo-long moved
    to a Dask cluster and kept its tables): changing it must not refuse the study's store."""
    from rlheal.store import Store, StoreError

    local = parse_config({"name": "t"})
    dask = parse_config({"name": "t", "runner": {"kind": "dask", "n_workers": 2}})
    store = Store(tmp_path)
    store.claim_study("t", local.claim())
    store.check_claim("t", dask.claim())
    with pytest.raises(StoreError, match=r"sft.learning_rate"):
        store.check_claim("t", parse_config({"name": "t", "sft": {"learning_rate": 1e-4}}).claim())


def test_a_config_with_the_old_editing_section_is_told_its_new_name():
    """issue 16 renamed the section to the stage's one name; the old key is refused with where it went."""
    with pytest.raises(ConfigError, match="editing: the section is now called edit"):
        parse_config({"name": "t", "editing": {"grid": "small"}})
    assert parse_config({"name": "t", "edit": {"grid": "small"}}).edit.grid == "small"
