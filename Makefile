# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   -> virtual environment + install + `sdeseg demo` on the embedded synthetic dataset
#   make test   -> the same environment + the test tools + the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# STAMP: the project and its runtime dependencies (all the demo needs); DEV_STAMP: + the [dev]
# tools (tests, lint, the GPU check), which make test adds
STAMP := $(VENV)/.sdeseg-installed
DEV_STAMP := $(VENV)/.sdeseg-dev-installed
# One pin list for every install, here and in the Dockerfile (requirements/lock.txt; `make lock`
# rewrites it). It pins torch to 2.13.0: where a local CPU build of that version is on disk pip
# keeps it, elsewhere on Linux x86_64 the index serves the CUDA build. pip >= 26.2 no longer lets
# PIP_CONSTRAINT reach the isolated build environments of source packages: PIP_BUILD_CONSTRAINT does.
LOCK := $(CURDIR)/requirements/lock.txt
export PIP_CONSTRAINT := $(LOCK)
export PIP_BUILD_CONSTRAINT := $(LOCK)
export RAY_AUTH_MODE ?= disabled
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint clean lock gpu-check

install: $(DEV_STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/sdeseg demo --out demo_out

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q --durations=30 tests

# Rewrite requirements/lock.txt from what .venv has installed plus the image's resolve (tune/lock.py).
lock:
	test -x $(BIN)/python || { echo "no $(VENV): run make install first"; exit 1; }
	$(BIN)/python -m tune.lock

# On a CUDA machine: CUDA tests, op benchmark, short SDE and semi-supervised runs with the Triton
# and the reference ops; one table in gpu_check/gpu_check.md (+ .json). Exits 2 without CUDA.
gpu-check: $(DEV_STAMP)
	$(BIN)/python -m tune.gpu_check --out gpu_check

lint: $(DEV_STAMP)
	$(BIN)/ruff check sdeseg data_prep tune tests

clean:
	rm -rf $(VENV) demo_out runs gpu_check
