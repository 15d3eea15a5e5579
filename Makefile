# The two commands a newcomer needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench deps

# Bytecode compiled, as a wheel's install does: where none is written (PYTHONDONTWRITEBYTECODE),
# every naiad process would compile its modules again.
$(BIN)/naiad: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m compileall -q src
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
