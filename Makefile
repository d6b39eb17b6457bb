# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# A new run directory each time, so earlier results stay.
RUN_DIR ?= runs/breast_cancer_untrusted-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test test-unit test-integration test-e2e test-fast test-durations layers bench clean

$(BIN)/activate:
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "hetrain needs Python 3.11+, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/hetrain demo-data
	$(BIN)/hetrain train configs/breast_cancer_untrusted.yaml --run-dir $(RUN_DIR)

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# Test tiers (tests/tiers.py): unit (no TenSEAL keys, no Prefect), integration, e2e (full training runs).
# The unit tier runs in one process: two xdist workers would cost more to start than its tests take.
test-unit: $(VENV)/.installed
	$(BIN)/python -m pytest -m unit -n 0

test-integration: $(VENV)/.installed
	$(BIN)/python -m pytest -m integration

test-e2e: $(VENV)/.installed
	$(BIN)/python -m pytest -m e2e

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "unit or integration"

# A full run that rewrites tests/durations.json, which orders the modules across the xdist workers.
test-durations: $(VENV)/.installed
	$(BIN)/python -m pytest --store-durations

# lint-imports on the package layering (pyproject.toml [tool.importlinter]), via its test: see tests/test_layers.py
layers: $(VENV)/.installed
	$(BIN)/python -m pytest -n 0 -q tests/test_layers.py

bench: $(VENV)/.installed
	$(BIN)/hetrain bench

clean:
	rm -rf $(VENV) runs data/demo
