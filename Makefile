# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NP     ?= 2
CONFIG ?= configs/default.yaml
RUN    ?= demo-$(shell date +%Y%m%d-%H%M%S)
export OMP_NUM_THREADS ?= 1

.PHONY: demo test data venv clean-runs

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	@touch $(STAMP)

# Real Fashion-MNIST, offline: Debian's dataset-fashion-mnist package, unpacked for torchvision.
data: $(STAMP)
	$(PY) -m fedmetanas.data.fetch --root data

demo: data
	scripts/mpirun.sh -np $(NP) $(PY) launch/main.py --config $(CONFIG) --name $(RUN)

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-runs:
	rm -rf runs
