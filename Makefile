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

# The default job, the paper's setting on the built-in synthetic image+tabular data (6,000 rows at
# 32 px, 1 % of the 3,600 training rows labelled: 36 rows): TIP pretraining on every row (no labels),
# then three models on the same labelled rows, each selected on validation, tested, exported and
# reloaded: STiL started from TIP, TIP fine-tuning (the same network, labelled rows only) and the
# supervised multimodal baseline; it ends by printing the three side by side. ARGS go to every stage.
# `make baseline` is the last of them alone.
# Each stage runs on STAGE_THREADS threads (1): the results depend on the thread count (float sums
# in another order), so one thread keeps them the ones docs/results_analysis.md records, and on a
# shared CPU more threads than free cores spin against each other (at a load average of 14, TIP ran
# at 12 s a step on the default threads, 0.7 s on one). After TIP, STiL trains on one core (its log in runs/stil_synthetic.log) while TIP fine-tuning
# and then the supervised model train on the other.
STAGE_THREADS ?= 1
LAUNCH = HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$(STAGE_THREADS) $(VENV)/bin/accelerate launch --config_file accelerate_configs/cpu.yaml train.py
train: install
	$(LAUNCH) recipes/tip_synthetic.yaml $(ARGS)
	@mkdir -p runs && echo "STiL trains in the background (log: runs/stil_synthetic.log); TIP fine-tuning and the supervised model here"
	$(LAUNCH) recipes/stil_synthetic.yaml $(ARGS) > runs/stil_synthetic.log 2>&1 & stil=$$!; \
	$(LAUNCH) recipes/tip_finetune_synthetic.yaml $(ARGS) && \
	$(LAUNCH) recipes/supervised_synthetic_multimodal_1pct.yaml $(ARGS); rest=$$?; \
	echo "waiting for STiL (runs/stil_synthetic.log)"; \
	wait $$stil || { tail -n 20 runs/stil_synthetic.log; echo "make train: STiL failed, its log: runs/stil_synthetic.log"; exit 1; }; \
	exit $$rest
	$(PY) scripts/compare_runs.py "supervised multimodal (concat)=runs/supervised_synthetic_1pct" \
		"TIP pretraining + fine-tuning=runs/tip_finetune_synthetic" "STiL (from TIP)=runs/stil_synthetic" \
		--pretrain runs/tip_synthetic

baseline: install
	$(LAUNCH) recipes/supervised_synthetic_multimodal_1pct.yaml $(ARGS)

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
