# modelmux — every target creates the virtualenv it needs; nothing is installed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS := .modelmux/source
CONFIG ?= examples/quickstart/modelmux.yaml
PYTEST_ARGS ?=

.PHONY: all venv models run test check proto proto-check lint fmt bench clean

all: test

# Reinstalled only when pyproject.toml changes; pip's wheel cache keeps re-creation cheap.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

venv: $(STAMP)

# Example SavedModels, written by TensorFlow (never committed).
$(MODELS)/.done: scripts/make_models.py $(STAMP)
	$(BIN)/python scripts/make_models.py --out $(MODELS)
	@touch $@

models: $(MODELS)/.done

run: $(STAMP) models
	$(BIN)/modelmux up --config $(CONFIG)

test: $(STAMP) models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

proto: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/gen_protos.sh

# Fails when the committed generated code differs from what protos/ produces.
proto-check: proto
	@git diff --exit-code --stat -- clients/ || { echo "generated code drifted from protos/: run make proto and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- clients/)" || { git status --porcelain -- clients/; echo "untracked generated files: run make proto and commit"; exit 1; }

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check: lint proto-check

bench: $(STAMP) models
	$(BIN)/python scripts/bench.py

clean:
	rm -rf .modelmux bench-results .pytest_cache .mypy_cache .ruff_cache
