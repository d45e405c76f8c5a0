# `make demo` and `make test` each set up .venv on a fresh machine by themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints-dev.txt
	$(BIN)/pip install --quiet -c constraints-dev.txt torch
	$(BIN)/pip install --quiet -c constraints-dev.txt -e ".[dev,all,examples]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/safeguard demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
