# modelmux — every target creates the virtualenv it needs; nothing is installed by hand.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS := .modelmux/source
CONFIG ?= examples/quickstart/modelmux.yaml
PYTEST_ARGS ?=
# The TypeScript client and buf (npm's @bufbuild/buf) live under clients/ts, installed from its
# package-lock.json; PROTO_BASELINE is what `buf breaking` compares protos/ with (docs/clients.md).
TS := clients/ts
TS_STAMP := $(TS)/node_modules/.installed
BUF := $(TS)/node_modules/.bin/buf
PROTO_BASELINE := 6d1e1055a801d3efb75aadca5f813627bec35164

.PHONY: all help venv models run test test-fast check proto proto-check lint fmt bench clean ts-deps ts-check proto-lint deploy-check import-check config-docs config-docs-check

all: test

help: ## this list
	@echo "make TARGET (every target creates .venv first when it needs it):"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  \1\t/' | expand -t 16

# Reinstalled only when pyproject.toml changes; pip's wheel cache keeps re-creation cheap. The
# first install downloads TensorFlow and takes minutes, so pip's own progress is shown. The full
# install: the embedded backend (the `backend` extra: TensorFlow) is what `make run` and the tests
# start; the gateway and modelsync alone install with `pip install .` (docs/operations.md, "Installing").
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "modelmux needs Python 3.11 or later (make PYTHON=python3.11 ...)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "Installing modelmux and its pinned dependencies into $(VENV) (about 2.7 GB with TensorFlow)"
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e '.[backend,dev]'
	@touch $@

venv: $(STAMP) ## create .venv from pyproject.toml (pinned versions)

$(TS_STAMP): $(TS)/package-lock.json
	npm ci --prefix $(TS) --no-audit --no-fund --loglevel=error
	@touch $@

ts-deps: $(TS_STAMP) ## install clients/ts's npm packages from its package-lock.json

# Example SavedModels, written by TensorFlow (never committed).
$(MODELS)/.done: scripts/make_models.py $(STAMP)
	$(BIN)/python scripts/make_models.py --out $(MODELS)
	@touch $@

models: $(MODELS)/.done ## write the example SavedModels into .modelmux/source/

run: $(STAMP) models ## start modelsync, the embedded backend and the gateway (Ctrl-C stops them)
	$(BIN)/modelmux up --config $(CONFIG)

test: $(STAMP) models $(TS_STAMP) ## run the test suite, the TypeScript client's included (PYTEST_ARGS='-k name' for a part)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fast tier: pure code in one process (no TensorFlow, no subprocess, no model files), in
# seconds; tests/unit/conftest.py fails a test that starts a process or reaches past loopback.
# `make test` runs it too.
test-fast: $(STAMP) ## run the fast unit tier (tests/unit/, seconds; PYTEST_ARGS as for test)
	$(BIN)/python -m pytest tests/unit -q $(PYTEST_ARGS)

proto: $(STAMP) $(TS_STAMP) ## regenerate clients/ (Python and TypeScript) from protos/
	PYTHON=$(BIN)/python bash scripts/gen_protos.sh
	$(BUF) generate --template $(TS)/buf.gen.yaml

# Fails when the committed generated code differs from what protos/ produces (only the generated
# paths: clients/ also holds the hand-written client libraries).
GENERATED := clients/modelmux/__init__.py clients/modelmux/v1 clients/modelmux/modelsync $(TS)/src/gen \
	modelmux_common/tfserving_protos/descriptors.binpb
proto-check: proto ## fail when the committed generated code differs from protos/
	@git diff --exit-code --stat -- $(GENERATED) || { echo "generated code drifted from protos/: run make proto and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- $(GENERATED))" || { git status --porcelain -- $(GENERATED); echo "untracked generated files: run make proto and commit"; exit 1; }

lint: $(STAMP) ## ruff format --check, ruff check, mypy
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

fmt: $(STAMP) ## ruff format and ruff check --fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# buf lint and buf breaking against PROTO_BASELINE, for protos/ (buf.yaml) and, as a workspace
# of its own, protos/tfserving/ (its buf.yaml), which is checked once the baseline has it.
proto-lint: $(TS_STAMP) ## buf lint and buf breaking over protos/ and protos/tfserving/
	$(BUF) lint
	$(BUF) lint protos/tfserving
	@base=$$(mktemp -d) && trap 'rm -rf "$$base"' EXIT && \
	  git archive $(PROTO_BASELINE) protos | tar -x -C "$$base" && \
	  if [ -d "$$base/protos/tfserving" ]; then mv "$$base/protos/tfserving" "$$base/tfserving"; fi && \
	  $(BUF) breaking --against "$$base/protos" && \
	  if [ -d "$$base/tfserving" ]; then $(BUF) breaking protos/tfserving --against "$$base/tfserving"; \
	  else echo "buf breaking: protos/tfserving is not in PROTO_BASELINE yet"; fi

# The TypeScript client type-checks (tsc --noEmit, strict).
ts-check: $(TS_STAMP) ## type-check the TypeScript client
	$(TS)/node_modules/.bin/tsc -p $(TS) --noEmit

# hadolint on deploy/docker, every deploy/k8s overlay rendered and validated against the
# Kubernetes schemas (deploy/check.py: no cluster, no Docker engine).
deploy-check: $(STAMP) ## hadolint the Dockerfiles, render and validate every Kubernetes overlay
	$(BIN)/python deploy/check.py

# No two of the project's modules import each other, even through others (scripts/check_imports.py).
import-check: $(STAMP) ## fail on an import cycle among the project's modules
	$(BIN)/python scripts/check_imports.py

# docs/config.md is written from the config's declarations (modelmux_common/config/schema.py).
config-docs: $(STAMP) ## write docs/config.md from the config's declarations
	$(BIN)/python scripts/gen_config_docs.py

config-docs-check: $(STAMP) ## fail when docs/config.md differs from the config's declarations
	$(BIN)/python scripts/gen_config_docs.py --check

check: lint import-check proto-check proto-lint ts-check deploy-check config-docs-check ## lint, import cycles, proto-check, buf, tsc, deploy-check, config-docs-check (what CI runs before the tests)

bench: $(STAMP) models ## the benchmarks (docs/benchmarks.md)
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench_async.py
	$(BIN)/python scripts/bench_batch.py

clean: ## remove models, volumes, bench results and caches (keeps .venv)
	rm -rf .modelmux bench-results .pytest_cache .mypy_cache .ruff_cache
