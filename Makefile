# The README's two commands. Everything else a fresh machine needs is fetched by these.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/pip install --quiet --config-settings editable_mode=compat
PYTEST_ARGS ?=

.PHONY: demo test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -e '.[dev]'
	touch $@ $(VENV)/.installed

# The npm clients the tests drive (graphql-ws, as the dashboard's Apollo Client speaks it).
tests/js/node_modules/.package-lock.json: tests/js/package-lock.json
	npm ci --prefix tests/js --no-audit --no-fund --loglevel=error

## make demo: create .venv if missing, install rtml, run the main job on embedded defaults.
demo: $(VENV)/.installed
	$(BIN)/rtml demo

## make test: install the dev extra, start the real test services, run the suite, stop the services.
test: $(VENV)/.dev-installed tests/js/node_modules/.package-lock.json
	@trap '$(BIN)/rtml services down' EXIT; \
	$(BIN)/rtml services up && \
	$(BIN)/python -m pytest $(PYTEST_ARGS)
