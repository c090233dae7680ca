# Two commands do all the set-up on a fresh machine with only Python >= 3.11:
#   make demo   - the main job (creates/reuses .venv, installs qkvlab, runs `qkvlab demo`)
#   make test   - the test suite (same environment, plus the dev extras)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qkvlab-installed

.PHONY: demo test test-all lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "qkvlab needs Python >= 3.11"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# A CPU build of torch is enough; keep an existing torch, else take 2.13.0 (a local wheel on
	# our machines), else any torch >= 2.5 the index offers.
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install 'torch==2.13.0' || $(PY) -m pip install 'torch>=2.5'
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qkvlab demo

test: $(STAMP)
	$(PY) -m pytest

# test plus the tests marked slow (larger runs of paths the default tests cover)
test-all: $(STAMP)
	$(PY) -m pytest -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/cpu_variants.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
