# `make run`: set up (first time) and run the compression pipeline on the embedded default, the photo testbed
# (presets/photos.yaml); `make run PRESET=digits`: on the digits (presets/digits.yaml).
# `make test`: set up (first time) and run the whole test suite; `make test-fast`: the edit-test loop (no servers,
# flows, torchrun or DVC; under 3 minutes on 2 cores). `make lint`: ruff, and params.yaml against the schema.
# `make docs`: the docs site (mkdocs, offline) after checking that the generated pages are up to date;
# `make results`: the results pages from results/*.csv and the configuration reference from the schema.
# `make bench`: the speed benchmark suite (tens of minutes on 2 cores); `make bench BENCH_ARGS=--quick` smoke-runs it.
PYTHON ?= python3
PRESET ?= photos
BENCH_ARGS ?=
DEVICE_ARGS ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast lint params bench device-check repro serve clean docs results

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m flows.compress --params presets/$(PRESET).yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pipeline params --check

# after changing a default in pipeline/config.py
params: $(STAMP)
	$(BIN)/python -m pipeline params > params.yaml

repro: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

serve: $(STAMP)
	$(BIN)/python -m flows.serve

bench: $(STAMP)
	$(BIN)/python -m benchmarks.suite $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# the GPU check (benchmarks/device_check.py); DEVICE_ARGS=--quick runs its code paths on the CPU
device-check:
	$(BIN)/python -m benchmarks.device_check $(DEVICE_ARGS)

results: $(STAMP)
	$(BIN)/python -m benchmarks.report
	$(BIN)/python -m pipeline reference
	$(BIN)/python -m benchmarks.figures

docs: $(STAMP)
	$(BIN)/python -m benchmarks.report --check
	$(BIN)/python -m pipeline reference --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict
	! grep -rEl '<(link|script)[^>]*(href|src)="https?:' site
