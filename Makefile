# One entry point per thing a user does. Every target sets up .venv first.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/toy.yaml
# Exact versions of every package but torch (constraints.txt, `make lock`): a fresh install
# computes the same numbers as the one the golden tables were saved under. CONSTRAINTS= drops it.
CONSTRAINTS ?= constraints.txt
PIP_C = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

# One torch thread per process: on 2 cores, 2 threads under contention ran 10x slower.
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

PREFECT_PORT ?= 4200
POOL ?= rlheal

.PHONY: setup test test-integration test-browser test-slow faults demo demo-seeds demo-long demo-long-seeds demo-virl demo-virl-seeds bench server deploy worker lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || { $(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "rlheal needs Python >= 3.11"' && $(PYTHON) -m venv $(VENV); }
	# torch first, pinned: an unpinned resolve pulls a multi-GB CUDA build.
	$(PY) -m pip install -qq $(PIP_C) "$(TORCH)"
	$(PY) -m pip install -qq $(PIP_C) -e ".[dev]"
	$(PY) -c 'import torch, prefect, trl, transformers, peft, datasets, polars, pyarrow, matplotlib, flows.study'
	touch $(STAMP)

# pytest exits 5 when a selection holds no test: nothing failed.
NONE_IS_OK := || test $$? -eq 5
# Two pytest-xdist workers, one per core: a serial run leaves a core idle while a test waits
# on its `rlheal` subprocess (measured: 23 min instead of 46 min for `make test` on a loaded
# machine). The workers share one build of the smoke study (tests/conftest.py).
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),-p no:xdist,-n $(TEST_WORKERS))

# The fast suite: unit and module tests, and the end-to-end tests that start from a copy of
# the session's one finished smoke study.
test: setup
	$(PY) -m pytest -m "not slow and not faults and not integration and not browser" $(XDIST) -q --durations=15 $(NONE_IS_OK)

# The long end-to-end tests: whole studies from an empty store (fault at every stage, Dask,
# replicate, kill -9, two runs at once, deployment, token scan). CI runs it after `make test`.
test-integration: setup
	$(PY) -m pytest -m "integration and not slow and not faults and not browser" $(XDIST) -q --durations=15 $(NONE_IS_OK)

# The dashboard in a real browser (issue 18): Chromium from the OS packages, installed here
# when missing (CI's fresh machine has network to the package registries).
test-browser: setup
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  SUDO=$$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }
	$(PY) -m pytest -m browser tests/browser -q -p no:xdist

faults: setup
	$(PY) -m pytest tests/faults -q $(NONE_IS_OK)

test-slow: setup
	$(PY) -m pytest -m slow -q $(NONE_IS_OK)

demo: setup
	$(VENV)/bin/rlheal run $(CONFIG)

# The demo's study again with two more seeds (SFT hand stream, RL hands and sampling: PPO
# rollouts or GRPO completions, whichever the config runs), then
# the four findings judged on all three side by side: store/replicates/toy+toy-seed1+toy-seed2/.
SEEDS ?= 1 2
# $(call seeds,CONFIG,NAME): NAME-seed<n> for each of SEEDS, then the comparison with NAME.
define seeds
	for n in $(SEEDS); do \
	  $(VENV)/bin/rlheal run $(1) --set name=$(2)-seed$$n --set data.train_seed=$$n --set rl.seed=$$n --set rl.decoding.seed=$$((42 + n)) --set rl.grpo.decoding.seed=$$((42 + n)) || exit 1; \
	done
	$(VENV)/bin/rlheal compare $(2) $(foreach n,$(SEEDS),$(2)-seed$(n))
endef
demo-seeds: demo
	$(call seeds,$(CONFIG),toy)

# The recovery-window study (issue 15): RL with the settings chosen on ID criteria alone
# (docs/toy-rl.md) from early, mid and late SFT starts; at most 45 minutes on 2 cores.
demo-long: setup
	$(VENV)/bin/rlheal run configs/toy-long.yaml

demo-long-seeds: demo-long
	$(call seeds,configs/toy-long.yaml,toy-long)

# The second task (issue 17): the whole study on V-IRL navigation from the shipped V-IRL base.
demo-virl: setup
	$(VENV)/bin/rlheal run configs/toy-virl.yaml

demo-virl-seeds: demo-virl
	$(call seeds,configs/toy-virl.yaml,toy-virl)

bench: setup
	$(PY) benchmarks/bench_verifier.py

# Prefect server on loopback only; SQLite under PREFECT_HOME by default. For PostgreSQL set
# PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://user:pass@host:5432/prefect.
server: setup
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

deploy: setup
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(VENV)/bin/prefect work-pool create $(POOL) --type process --overwrite
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api RLHEAL_HOME=$(CURDIR) $(VENV)/bin/prefect deploy --prefect-file deployments.yaml --all --no-prompt

worker: setup
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(VENV)/bin/prefect worker start --pool $(POOL)

# Rewrite constraints.txt from what .venv holds now. To upgrade: make clean, make setup
# CONSTRAINTS=, make test (a numeric change shows in tests/test_golden.py), then make lock.
lock: setup
	{ echo "# Exact versions for make setup (pip -c): written by make lock, torch pinned by TORCH."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|nvidia-)'; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
