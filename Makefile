# The README's commands. Every target bootstraps .venv first (scripts/setup.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m repro experiment=demo

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check repro tests benchmarks
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) -m benchmarks

clean:
	rm -rf runs reports/demo outputs multirun .pytest_cache
