# The two commands a newcomer types: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
# Extra pip arguments for torch, e.g. TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu" on a machine
# without a local CPU wheel, or a CUDA index for GPUs (see README).
TORCH_ARGS ?=
CONSTRAINTS := requirements/constraints.txt
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true

.PHONY: install demo test lock clean

# torch first and pinned: unpinned, a dependency would pull a multi-GB CUDA build (STACK.md).
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH) $(TORCH_ARGS)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The whole method on the built-in organism: SAE grid + taxonomy, steering vectors, then base / thinking / hybrid
# (+ controls) on the organism's test split. Each stage resumes or reuses its cache when rerun.
DEMO := outputs/demo
demo: install
	$(OFFLINE) $(PY) train.py hydra.run.dir=$(DEMO)/train
	$(OFFLINE) $(PY) steer.py train_dir=$(DEMO)/train hydra.run.dir=$(DEMO)/steer
	$(OFFLINE) $(PY) eval.py train_dir=$(DEMO)/train steer_dir=$(DEMO)/steer hydra.run.dir=$(DEMO)/eval

test: install
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) -m pytest

lock: install
	$(PIP) freeze --exclude-editable | sed 's/+cpu$$//' > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf outputs multirun .cache
