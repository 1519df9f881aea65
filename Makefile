# `make run`: set up (first time) and run the compression pipeline on the embedded digits data.
# `make test`: set up (first time) and run the test suite.
# `make bench`: the speed benchmark suite (tens of minutes on 2 cores); `make bench BENCH_ARGS=--quick` smoke-runs it.
PYTHON ?= python3
BENCH_ARGS ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test bench repro serve clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m flows.compress

repro: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

serve: $(STAMP)
	$(BIN)/python -m flows.serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.suite $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
