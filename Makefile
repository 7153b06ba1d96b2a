# Two commands do all set-up on a machine with only Python:
#   make demo   - an end-to-end demo sync on embedded defaults
#   make test   - the whole test suite (parallel workers)
#   make test-fast - everything but the browser, Dagster-process, Celery, soak and slow tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test test-fast demo dev lint typecheck check bench-engine clean venv

# pytest-xdist workers. Most test time is spent waiting on subprocesses, sockets and
# Postgres, so more workers than cores pays; tests that share an expensive server run
# on one worker (xdist_group + --dist loadgroup). docs/testing.md has the figures.
TEST_WORKERS ?= 6
PYTEST_PARALLEL := -n $(TEST_WORKERS) --dist loadgroup
# The fast lane starts no Dagster process to wait for: its tests mostly compute, and every worker
# first pays for its own imports and collection, so on two cores fewer workers do the same work
# with less CPU (docs/testing.md has the figures). `make test-fast FAST_TEST_WORKERS=n` changes it.
FAST_TEST_WORKERS ?= 4
FAST_PARALLEL := -n $(FAST_TEST_WORKERS) --dist loadgroup
# Bytecode caches on, whatever the shell says: with PYTHONDONTWRITEBYTECODE set, every xdist
# worker re-did pytest's assertion rewriting of the test modules and of the schemathesis plugin
# (~4 s of CPU each), and every subprocess a test starts (code servers, `syncflow ...`) compiled
# syncflow_dagster from source again. The caches are gitignored __pycache__ directories.
PYTEST_ENV := PYTHONDONTWRITEBYTECODE=
FAST_MARKERS := not (ui or daemon or celery or soak or slow)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

test: $(STAMP)
	$(PYTEST_ENV) $(BIN)/python -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PYTEST_ENV) $(BIN)/python -m pytest $(FAST_PARALLEL) -m "$(FAST_MARKERS)" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/syncflow demo

dev: $(STAMP)
	$(BIN)/syncflow dev

lint: $(STAMP)
	$(BIN)/ruff check syncflow_dagster syncflow_dagster_tests benchmarks
	$(BIN)/ruff format --check syncflow_dagster syncflow_dagster_tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

bench-engine: $(STAMP)
	$(BIN)/python -m benchmarks engine --rows 1000000 --json docs/benchmarks/engine.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
