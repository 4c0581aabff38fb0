# ESM3 training suite. `make demo` and `make test` do all their own set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ESM3 := $(BIN)/esm3
WORKSPACE ?= workspace
CONFIG ?=
CLUSTER ?=
Q ?= SELECT * FROM runs ORDER BY submitted_at DESC LIMIT 20
FORMAT ?= table
PYTEST_ARGS ?=
# The CPU build of torch: a plain `torch` requirement would pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export ESM3_WORKSPACE ?= $(abspath $(WORKSPACE))

.PHONY: help setup tools demo test lint format bench submit-preprocess submit-train \
        dashboard sql slurm-up slurm-down clean gpu-wheels gpu-check

help:  ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /\1\t/' | column -t -s $$'\t'

tools:  ## install (Debian, root) or check the system tools: mmseqs2, mkdssp, SLURM, munge
	@bash containers/install-tools.sh --slurm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml tests/requirements-esm.txt | $(BIN)/python
	@# torch first: CPU build unless a CUDA torch is already importable in this venv
	@if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  $(BIN)/pip install -q "$(TORCH_SPEC)" 2>/dev/null || \
	  $(BIN)/pip install -q --index-url $(TORCH_CPU_INDEX) "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[dev]"
	@# real PDB/mmCIF test structures; --no-deps keeps MDAnalysis itself out
	$(BIN)/pip install -q --no-deps MDAnalysisTests
	@# EvolutionaryScale's esm, the reference of the parity tests; --no-deps keeps the CPU torch
	$(BIN)/pip install -q --no-deps "esm==3.2.1.post1" "transformers==4.48.1"
	$(BIN)/pip install -q -r tests/requirements-esm.txt
	@touch $@

setup: tools $(VENV)/.installed  ## system tools + .venv with the project and dev extras

demo: setup  ## run the main job on the embedded default (local executor, real data)
	$(ESM3) demo

slurm-up: setup  ## start the local SLURM cluster (munged, slurmctld, one slurmd per node)
	$(ESM3) slurm up

slurm-down:  ## stop what slurm-up started
	@if [ -x $(ESM3) ]; then $(ESM3) slurm down; fi

test: setup  ## the whole test suite, on a real local SLURM cluster and headless Chromium
	@bash containers/install-tools.sh --slurm --browser --strace
	$(ESM3) slurm up
	@set -o pipefail; rc=0; \
	  $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	  $(ESM3) slurm down; exit $$rc

lint: setup  ## ruff check and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup  ## benchmarks; results printed and written to the `benchmarks` table
	$(ESM3) slurm up
	@rc=0; $(ESM3) bench || rc=$$?; $(ESM3) slurm down; exit $$rc

submit-preprocess: setup  ## preprocessing arrays: make submit-preprocess CONFIG=... CLUSTER=...
	$(ESM3) preprocess all $(if $(CONFIG),--config $(CONFIG)) $(if $(CLUSTER),--cluster $(CLUSTER))

submit-train: setup  ## training: make submit-train CONFIG=... CLUSTER=...
	$(ESM3) train $(if $(CONFIG),--config $(CONFIG)) $(if $(CLUSTER),--cluster $(CLUSTER))

dashboard: setup  ## Streamlit dashboard on the workspace (localhost)
	$(ESM3) dashboard

sql: setup  ## read-only SQL: make sql Q="SELECT ..." [FORMAT=csv|json]
	@$(ESM3) sql --format $(FORMAT) "$(Q)"

# The GPU check runs in any Python with a CUDA torch, numpy and pyarrow: the venv where
# one exists, else the machine's own python3 (no `make setup` needed).
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
GPU_WHEELS ?= gpu-wheels
GPU_CHECK_OUT ?= artifacts/gpu-check.md
# torchao's float8 training (the FP8 backend beside TransformerEngine); 0.17.0 is the
# release made for torch 2.11 and accepts newer torch
TORCHAO_SPEC ?= torchao==0.17.0

gpu-wheels:  ## download the wheels gpu-check needs on a machine without network (into gpu-wheels/)
	$(GPU_PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_17_x86_64 -d $(GPU_WHEELS) "$(TORCHAO_SPEC)"

gpu-check:  ## the GPU path in one bounded run (<= 6 min): one table; skips where there is no CUDA
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) -m jobs.gpucheck --wheels $(GPU_WHEELS) --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build *.egg-info

include containers/images.mk
