# `make run` / `make test`: each creates .venv on first use (and again when pyproject.toml changes).
# `make test` is the full suite (what CI runs), in two pytest-xdist processes, each test file in one of them (module
# fixtures stay shared; a test that hangs past pyproject.toml's timeout fails the run, not restarted); `make unit`
# the tests on synthetic data only (about 40 s on 2 cores).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed
ARGS ?=
# `make run CONFIG=configs/movietweetings.yaml`: the main job on the second dataset
CONFIG ?= configs/default.yaml

.PHONY: run test unit bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 is needed"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/h2po run --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --max-worker-restart 0 $(ARGS)

unit: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m unit $(ARGS)

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/sampler.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
