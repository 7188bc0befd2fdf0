# The two commands of the README: `make run` (demo chain on the embedded server) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
COV_MIN ?= 90
PYTEST_ARGS ?=

.PHONY: install run test bench clean

# `make run` installs what handoff needs; `make test` adds the test dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(DEV_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/handoff dev --demo examples/samples/inventory_service.py --approve

test: $(DEV_STAMP)
	$(PY) -m pytest --cov --cov-report=term --cov-fail-under=$(COV_MIN) $(PYTEST_ARGS)

bench: $(DEV_STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) -m bench

clean:
	rm -rf $(VENV) .coverage .coverage.* .pytest_cache *.egg-info
