# Two entry points (see README): `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= experiments/configs/transformer.py:small
WORKDIR ?= runs/small
# glibc malloc setting for XLA:CPU: transparent huge pages for the temporaries it allocates afresh
# every step (2 MiB page faults, not 4 KiB). Same string as efficient_arch.hardware.CPU_MALLOC_TUNABLES
# (tests/test_hardware.py keeps them equal); measured in benchmarks/NOTES.md "session 7".
MALLOC_TUNABLES ?= glibc.malloc.hugetlb=1
# pytest workers: 2 by default (the CI machine has 2 cores); `make test JOBS=0` runs serially.
# --dist loadfile keeps a test file on one worker, so its module-scoped fixtures (the 8-device and
# multi-process children, the quick tables) run once, not once per worker.
JOBS   ?= 2

.PHONY: venv train test clean

$(BIN)/efficient-arch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

venv: $(BIN)/efficient-arch

train: venv
	GLIBC_TUNABLES=$(MALLOC_TUNABLES) $(BIN)/efficient-arch train --config=$(CONFIG) --workdir=$(WORKDIR)

test: venv
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadfile --durations=15 tests

clean:
	rm -rf $(VENV) runs .cache
