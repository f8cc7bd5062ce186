# mmzoo: every target installs what it needs first, so on a fresh machine `make train` and `make test` suffice.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mmzoo-installed
# The dev extras (test tools, parity references such as diffusers, pyarrow, pycocoevalcap) are only for tests and
# benchmarks: training and evaluating need the runtime install alone.
DEV_STAMP := $(VENV)/.mmzoo-dev-installed
# torch first and pinned: on our machines these two wheels install from local disk; override for another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# uv installs the same pinned wheels from the same index as pip, but unpacks them in parallel: torch's CUDA build
# is 5.7 GB on disk, and the runtime install takes about 35 s instead of pip's 125 s on a fresh 2-core machine.
# INSTALLER=pip uses pip instead (uv does not read pip.conf: use pip where only pip's configuration names your index).
INSTALLER ?= uv
ifeq ($(INSTALLER),uv)
INSTALL = $(BIN)/uv pip install --python $(BIN)/python
else
INSTALL = $(BIN)/python -m pip install
endif
RECIPE ?= recipes/moe_llava/shapes_tiny.yaml
MODEL  ?= moe_llava_tiny.shapes
TASKS  ?= shapes_vqa,shapes_pope
PYTEST_ARGS ?=

.PHONY: setup runtime train eval test test-all bench lint clean help

help:
	@echo "make setup            create $(VENV) with mmzoo (editable) and dev tools"
	@echo "make runtime          create $(VENV) with mmzoo (editable) only (what train and eval need)"
	@echo "make train [RECIPE=]  run a staged recipe (default: $(RECIPE))"
	@echo "make eval  [MODEL= TASKS=]  evaluate a model (default: $(MODEL) on $(TASKS))"
	@echo "make test             fast test suite;  make test-all  also the slow end-to-end tests"
	@echo "make bench            benchmarks, printed as ratios against same-run baselines"
	@echo "make lint             ruff"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),uv)
	$(BIN)/python -m pip install -q uv
else
	$(BIN)/python -m pip install -q --upgrade pip
endif
	$(INSTALL) -q $(TORCH_SPEC)
	$(INSTALL) -q -e .
	@touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(INSTALL) -q -e '.[dev]'
	@touch $(DEV_STAMP)

runtime: $(STAMP)

setup: $(DEV_STAMP)

train: runtime
	$(BIN)/zoo train $(RECIPE)

eval: runtime
	$(BIN)/zoo eval --model $(MODEL) --tasks $(TASKS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: setup
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m eval.bench

lint: setup
	$(BIN)/ruff check zoo data eval tests

clean:
	rm -rf $(VENV) runs .pytest_cache
