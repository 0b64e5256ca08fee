# structvae: every verb depends on `install`, so a fresh clone needs no separate setup step.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned first so pip never swaps in a different (multi-GB) build; override for your CUDA version.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXP ?= digits
ARGS ?=
CKPT ?=
N ?= 50000
SWEEP ?= svae_lowrank_celeba
PAPER ?= spatial-vae
BUDGET ?= cpu
DATA ?= data/mnist
OUT ?= outputs/gpu-check
DEVICE ?= cuda

.PHONY: install test test-fast lint format train fid explore sweep reproduce benchmark gpu-check clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	@# W&B's sweep engine (offline sweep expansion); it pins numpy<2 although its grid/random engine runs on numpy 2.
	$(PY) -m pip install -q --no-deps "sweeps==0.3.0"
	@touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

lint: install
	$(VENV)/bin/ruff check structvae tests benchmarks

format: install
	$(VENV)/bin/ruff format structvae tests benchmarks

train: install
	$(PY) -m structvae fit -c configs/experiment/$(EXP).yaml $(ARGS)

fid: install
	@test -n "$(CKPT)" || { echo "usage: make fid CKPT=path/to/model.ckpt [N=50000]"; exit 2; }
	$(PY) -m structvae fid --ckpt "$(CKPT)" --num-samples $(N) $(ARGS)

explore: install
	@test -n "$(CKPT)" || { echo "usage: make explore CKPT=path/to/model.ckpt [ARGS='--images 4 --figures pc_walk edit']"; exit 2; }
	$(PY) -m structvae explore --ckpt "$(CKPT)" $(ARGS)

sweep: install
	$(PY) -m structvae sweep configs/sweep/$(SWEEP).yaml $(ARGS)

reproduce: install
	$(PY) -m structvae reproduce $(PAPER) --budget $(BUDGET) --data-root $(DATA) $(ARGS)

# ARGS go to the training-step benchmark, e.g. make benchmark ARGS=--full (every option at 218×178 too).
benchmark: install
	$(PY) benchmarks/lowrank_likelihood.py
	$(PY) benchmarks/sparse_precision.py
	$(PY) benchmarks/host_allocator.py
	$(PY) benchmarks/train_step.py $(ARGS)

# Every CUDA check in one time-boxed run (≤ 8 min on one GPU): OUT/gpu_check.{json,md}. DEVICE=cpu: the dry run.
gpu-check: install
	PY=$(PY) DEVICE=$(DEVICE) scripts/gpu_check.sh "$(OUT)" $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs wandb
