# The README's two commands: `make train` (default job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Exact versions the suite passed with; `make install` installs exactly these, `make lock` refreshes them.
LOCK := constraints.txt

.PHONY: install train baseline test lock

$(VENV)/.installed: setup.cfg pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[test]"
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

# Refresh the lock: the newest releases the registry offers, in a fresh venv beside the project's; the
# suite must pass with them before they replace $(LOCK). Then `make test` reinstalls from the new lock.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[test]"
	HF_HUB_OFFLINE=1 $(LOCK_VENV)/bin/python -m pytest -q -n 2 -p no:cacheprovider
	{ echo "# Exact versions the test suite passed with ($$($(LOCK_VENV)/bin/python -c 'import platform; print("Python", platform.python_version(), platform.machine())'), $$(date +%F))."; \
	  echo "# make install / make test / .ci/run install these (pip -c). Refresh: make lock (README, 'Two commands')."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
