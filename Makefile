# The README's two commands: `make quickstart` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup quickstart test lint format bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

quickstart: setup
	PATH=$(CURDIR)/$(BIN):$$PATH bash examples/quickstart_cpu.sh

test: setup lint
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check megatron tools tests bench
	$(BIN)/ruff format --check megatron tools tests bench
	$(BIN)/lint-imports --no-cache

format: setup
	$(BIN)/ruff check --fix megatron tools tests bench
	$(BIN)/ruff format megatron tools tests bench

bench: setup
	for script in bench/*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) quickstart runs .pytest_cache .ruff_cache
