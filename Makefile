# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create or reuse .venv and install torch==2.13.0 in the same pip call as the project, so a
# fresh clone on a CPU machine gets the CPU wheel rather than a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m weightdiff demo

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf runs lightning_logs .pytest_cache
