# The README's two commands: `make train` (default job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install train test

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Trains the default job on the built-in synthetic image+tabular data, evaluates it on the test
# split, exports it with a model card and reloads it with from_pretrained.
train: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml train.py $(ARGS)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=15 $(ARGS)
