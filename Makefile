# The README's two commands: `make train` (default job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install train baseline test

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The default job, in two stages on the built-in synthetic image+tabular data: TIP pretraining on
# every row (no labels), then STiL started from it (10 % labelled); each selected on validation,
# tested, exported and reloaded with from_pretrained. ARGS go to both stages.
# `make baseline` trains the supervised multimodal baseline on the same data for comparison.
train: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml train.py recipes/tip_synthetic.yaml $(ARGS)
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml train.py recipes/stil_synthetic.yaml $(ARGS)

baseline: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml train.py $(ARGS)

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=15 $(ARGS)
