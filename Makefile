# The index of routine tasks. Each target works from a fresh clone: the first
# one run creates .venv and installs voteflow into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint format docs migrate bench loadtest screenshots lock clean

# The versions installed are requirements.lock's (pip's own too): those the
# suite last passed with; make lock refreshes it.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c requirements.lock pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev,loadtest]'
	touch $(STAMP)

## run: the whole stack (private PostgreSQL and Redis unless VOTEFLOW_*_URL are set)
run: $(STAMP)
	$(BIN)/voteflow up

## test: lint, type-check, then every layer of tests (unit, integration, system) against real servers
test: lint $(STAMP)
	@$(call PYTEST,tests)

## test-fast: the unit and integration layers only (no processes, faults, proxies, cluster or browser)
test-fast: $(STAMP)
	@$(call PYTEST,tests/unit tests/integration)

# On up to 4 cores, saying why each skipped test skipped. A temporary directory
# of the run's own: pytest removes the oldest of the directories it numbers
# under /tmp/pytest-of-<user>, even while another run (another checkout's)
# still has its private servers' data in it.
PYTEST = tmp=$$(mktemp -d /tmp/voteflow-test.XXXXXX) && chmod 755 $$tmp; \
	$(BIN)/pytest -q -rs -n auto --maxprocesses 4 --dist worksteal --basetemp=$$tmp/run $(PYTEST_ARGS) $(1); \
	status=$$?; rm -rf $$tmp; exit $$status

## docs: the settings table of docs/operations.md, written anew from voteflow/settings.py
docs: $(STAMP)
	$(BIN)/python -m voteflow.settingsdoc docs/operations.md

## screenshots: the README's pictures of the pages, taken by their browser tests (needs chromium)
screenshots: $(STAMP)
	$(BIN)/pytest -q tests/system/test_admin_page.py tests/system/test_present.py tests/system/test_browser.py
	cp build/test-artifacts/admin-light.png docs/images/organizer.png
	cp build/test-artifacts/present-dark.png docs/images/presenter.png
	cp build/test-artifacts/vote-phone-light.png docs/images/voting-phone.png

## lock: requirements.lock anew, each dependency at its newest version that fits pyproject.toml; run make test after
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --upgrade --allow-unsafe --extra dev --extra loadtest \
		--strip-extras --no-emit-index-url --no-emit-find-links --output-file requirements.lock \
		pyproject.toml
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev,loadtest]'

## lint: ruff (lint and format check), mypy, and the direction of imports (lint-imports)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

## format: apply ruff's fixes and formatting
format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## bench: the stages of python -m loadtest.bench side by side (wrk needed); JSON in bench/results/
bench: $(STAMP)
	$(BIN)/python -m loadtest.bench $(BENCH_ARGS)

## loadtest: the Locust profile against a private stack (500 users at the peak), then the exactly-once verdict
loadtest: $(STAMP)
	$(BIN)/python -m loadtest.run $(LOADTEST_ARGS)

## migrate: apply sql/ migrations to $VOTEFLOW_DATABASE_URL
migrate: $(STAMP)
	$(BIN)/voteflow migrate

## clean: remove the virtualenv, caches and the private servers' data
clean:
	rm -rf $(VENV) .voteflow .mypy_cache .ruff_cache .pytest_cache
