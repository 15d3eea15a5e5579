# The two commands a newcomer needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench deps

$(BIN)/naiad: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

deps:
	bash .ci/system-deps

# Convert a small OCI image in a local layout to naiad, inspect, check and unpack it.
demo: deps $(BIN)/naiad
	PATH=$(CURDIR)/$(BIN):$$PATH bash scripts/demo.sh

test: deps $(BIN)/naiad
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest -q tests

bench: $(BIN)/naiad
	$(BIN)/python -m bench
