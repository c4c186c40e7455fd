# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   -> virtual environment + install + `sdeseg demo` on the embedded synthetic dataset
#   make test   -> the same environment + the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sdeseg-installed
# torch is pinned so pip keeps the local CPU build instead of pulling CUDA wheels;
# PIP_CONSTRAINT also reaches the isolated build environments of source packages.
export PIP_CONSTRAINT := $(CURDIR)/.ci/constraints.txt
export RAY_AUTH_MODE ?= disabled
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sdeseg demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check sdeseg data_prep tune tests

clean:
	rm -rf $(VENV) demo_out runs
