# orderflow: `make run` serves the whole stack on embedded defaults; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Dev values; a variable the caller sets in the environment wins over these.
export WEBHOOK_SIGNING_SECRET ?= dev-only-webhook-secret
# `make run` keeps its state here (SQLite, Temporal's database, mail, logs); another directory
# gives a second, separate stack.
export ORDERFLOW_DATA_DIR ?= .data
export DATABASE_URL ?= sqlite+aiosqlite:///$(ORDERFLOW_DATA_DIR)/orderflow.db
export ORDERFLOW_ENV ?= dev

.PHONY: run test test-sqlite test-postgres test-system test-fast test-slow test-fuzz lint format migrate bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

migrate: $(VENV)/.installed
	$(BIN)/alembic upgrade head

run: $(VENV)/.installed migrate
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/run-dev.sh

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@ $(VENV)/.installed

# The benchmarks of docs/benchmarks.md (10-15 minutes on 2 cores; BENCH_ARGS=--quick smokes),
# then the rush of docs/benchmark-notes.md (about 6 minutes; RUSH_ARGS="--database URL" runs it
# on PostgreSQL).
bench: $(VENV)/.installed-bench
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench $(BENCH_ARGS)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m bench.rush $(RUSH_ARGS)

# mypy reads bench/ too, so the bench extra's packages (DBOS, Celery) must be there for their types.
lint: $(VENV)/.installed-test $(VENV)/.installed-bench
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy .

# Lint once, then the whole suite on SQLite, then again on PostgreSQL when TEST_DATABASE_URL names a
# server (.ci/run sets it; each run creates and drops a database of its own there), then the
# system suite once.
test: $(VENV)/.installed-test lint
	$(MAKE) --no-print-directory test-sqlite
	if [ -n "$${TEST_DATABASE_URL:-}" ]; then $(MAKE) --no-print-directory test-postgres; fi
	$(MAKE) --no-print-directory test-system

test-sqlite: $(VENV)/.installed-test
	env -u TEST_DATABASE_URL PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest

test-postgres: $(VENV)/.installed-test
	@test -n "$${TEST_DATABASE_URL:-}" || \
	  { echo "set TEST_DATABASE_URL, e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test"; exit 2; }
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest

# The system suite (tests/system, about ten minutes on 2 cores): real worker, API and Temporal
# processes under compound faults, on a database it creates on the PostgreSQL server that
# TEST_DATABASE_URL names (default 127.0.0.1:5432) and drops afterwards; skipped, saying so, only
# when nothing listens there (with CI set the skip fails). Its outcome is rendered into
# docs/reliability.md whether it passed, failed or was skipped, with the run's date and commit.
# Sizes can be changed with SYSTEM_* variables (tests/system/test_scenarios.py).
test-system: $(VENV)/.installed-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -m system tests/system -p no:cacheprovider; \
	  status=$$?; $(BIN)/python -m tests.system.report; exit $$status

test-fast: $(VENV)/.installed-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -m "not slow and not system"

test-slow: $(VENV)/.installed-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -m slow

# The fuzz suite at length: many more cases per operation than the suite's quick fixed-seed run
# (FUZZ_SEED picks another seed); the figures land in test-output/fuzz-figures.json.
test-fuzz: $(VENV)/.installed-test
	FUZZ_MAX_EXAMPLES=$${FUZZ_MAX_EXAMPLES:-300} FUZZ_STATEFUL_EXAMPLES=$${FUZZ_STATEFUL_EXAMPLES:-60} \
	  FUZZ_STATEFUL_STEPS=$${FUZZ_STATEFUL_STEPS:-10} PATH="$(abspath $(BIN)):$$PATH" \
	  $(BIN)/pytest tests/fuzz -p no:cacheprovider
	cat test-output/fuzz-figures.json

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .data test-output
