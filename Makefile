# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NP     ?= 2
CONFIG ?= configs/default.yaml
NOW    := $(shell date +%Y%m%d-%H%M%S)
RUN    ?= demo-$(NOW)
export OMP_NUM_THREADS ?= 1

.PHONY: demo test data venv clean-runs

venv: $(STAMP)

# The pinned dependencies, then the project itself (editable: launch/main.py, the benchmarks and the tests
# import the installed package; no sys.path tricks).
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Real Fashion-MNIST, offline: Debian's dataset-fashion-mnist package, unpacked for torchvision.
data: $(STAMP)
	$(PY) -m fedmetanas.data.fetch --root data

demo: data
	scripts/mpirun.sh -np $(NP) $(PY) launch/main.py --config $(CONFIG) --name $(RUN)
	$(PY) -m fedmetanas.report runs/$(RUN)/trajectory.h5 --out runs/$(RUN)/report

# The end-to-end tests run on the real Fashion-MNIST in data/ (as `make demo` does); -rs prints why a test
# skipped (only absent hardware or services may skip: GPU, Slurm, Chromium; under CI=true missing data fails).
test: data
	$(PY) -m pytest -q -rs tests

clean-runs:
	rm -rf runs

# The batch scripts in slurm/ on a real one-node Slurm (munged + slurmctld + slurmd on loopback, started
# and stopped by the tests). Installs Debian's slurm-wlm and munge first when they are missing (as root).
SLURM_BINS := slurmctld slurmd munged sbatch
.PHONY: test-slurm
test-slurm: $(STAMP)
	@missing=0; for b in $(SLURM_BINS); do PATH="$$PATH:/usr/sbin:/sbin" command -v $$b >/dev/null || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "error: Slurm is not installed; as root run: apt-get install -y slurm-wlm munge" >&2; exit 1; fi; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q slurm-wlm munge || { apt-get update -q && apt-get install -y -q slurm-wlm munge; }; \
	fi
	$(PY) -m pytest -q tests/slurm tests/test_dist.py
