# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create or reuse .venv and install torch==2.13.0 in the same pip call as the project, so a
# fresh clone on a CPU machine gets the CPU wheel rather than a multi-GB CUDA build, and every
# other package at the version in constraints.txt (the versions the suite passed with).
# `make lock` moves those versions forward deliberately: it installs the newest releases into a
# scratch venv, runs the tests there and rewrites constraints.txt only if they pass.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
CONSTRAINTS := constraints.txt
LOCK_VENV := $(VENV)/lock

export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install lock clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c $(CONSTRAINTS) "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m weightdiff demo

test: $(STAMP)
	$(PY) -m pytest tests

# torch stays at $(TORCH) (change TORCH to move it); the local build label (+cpu, +cu124) is
# dropped so that the file fits CPU and CUDA machines alike.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --disable-pip-version-check --upgrade "$(TORCH)" -e ".[dev]"
	$(LOCK_VENV)/bin/python -m pytest tests
	{ grep '^#' $(CONSTRAINTS); $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable \
		| grep -v '^pip==' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf runs lightning_logs .pytest_cache
