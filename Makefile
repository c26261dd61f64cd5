# The project's checks, one command each; .ci/run runs `make check` and `make bench-smoke`.
# Use them inside the virtual environment of the README's set-up command.

PYTHON ?= python
SOURCES := per_buffer tests benchmarks

.PHONY: check lint types test test-fast bench-smoke bench-quick format

check: lint types test  ## everything CI checks, in the order it checks it

lint:  ## ruff: lint rules and formatting
	ruff check $(SOURCES)
	ruff format --check $(SOURCES)

types:  ## mypy in strict mode
	mypy per_buffer

test:  ## the README's test command
	pytest

test-fast:  ## the suite without the slow torture tests
	pytest -m "not slow"

bench-smoke:  ## every benchmark scenario once, tiny (fails on a crash or a lost activity)
	$(PYTHON) -m benchmarks --smoke

bench-quick:  ## the tables the README's Performance section shows
	$(PYTHON) -m benchmarks --quick --json bench.json

format:  ## rewrite the sources in the project's style
	ruff check --fix $(SOURCES)
	ruff format $(SOURCES)
