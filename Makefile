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
# (+ controls) on the organism's 600 test problems. Smaller than the paper's settings so that it finishes in about
# ten minutes on 2 CPU cores; each stage resumes or reuses its cache when rerun.
DEMO := outputs/demo
DEMO_TRAIN := data.limit=600 sae.n_latents=[5,10,15,20,30] sae.k=[1,3] sae.seeds=[0,1,2] sae.select=truth sae.max_epochs=100 sae.patience=5
DEMO_STEER := steering.lr=0.05 steering.n_examples=128 steering.max_epochs=25 steering.n_hit_examples=32
# coefficient and the compute ("step") vector's scale chosen on the validation split (README)
DEMO_EVAL := eval.batch_size=100 hybrid.batch_size=100 hybrid.coefficient=0.5 +hybrid.behavior_scales.step=0.25
demo: install
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) train.py hydra.run.dir=$(DEMO)/train $(DEMO_TRAIN)
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) steer.py train_dir=$(DEMO)/train hydra.run.dir=$(DEMO)/steer $(DEMO_STEER)
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) eval.py train_dir=$(DEMO)/train steer_dir=$(DEMO)/steer \
		hydra.run.dir=$(DEMO)/eval $(DEMO_EVAL)

test: install
	$(OFFLINE) OMP_NUM_THREADS=1 $(PY) -m pytest

lock: install
	$(PIP) freeze --exclude-editable | sed 's/+cpu$$//' > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean:
	rm -rf outputs multirun .cache
