# The two commands of the README: `make run` (demo chain on the embedded server) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
COV_MIN ?= 85
PYTEST_ARGS ?=

.PHONY: install run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/handoff dev --demo agents/samples/inventory_service.py

test: $(STAMP)
	$(PY) -m pytest --cov --cov-report=term --cov-fail-under=$(COV_MIN) $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) -m bench

clean:
	rm -rf $(VENV) .coverage .coverage.* .pytest_cache *.egg-info
