# Two commands do everything on a fresh machine (Python 3.11, no GPU, nothing installed):
#   make demo   trains the FSQ tokenizer + MaskGIT demo on the built-in data (the main job)
#   make test   runs the test suite (what CI runs)
# Both install torch and build the extension first (once; `make install` alone does just that).
#   make check  python -m fsq_kernels check: every backend against the reference on this machine
#   make bench  the quick benchmark report (every provider, vector-quantize-pytorch included)

PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.14.1
DEMO_OUT ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
BENCH_OUT ?= runs/bench-$(shell date +%Y%m%d-%H%M%S)
STAMP := .build-stamp

.PHONY: install test demo bench check clean

SHELL := /bin/bash
# Without nvcc only the CPU kernels build, and there is no ptxas output to check.
PTXAS_FLAGS := $(if $(shell command -v nvcc || test -x /usr/local/cuda/bin/nvcc && echo yes),,--allow-empty)

# The extension builds against the installed torch (--no-build-isolation); -v keeps ptxas's
# register/spill report in build/build.log, and check_ptxas.py fails the build on any spill.
$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet "setuptools>=77" wheel ninja pybind11
	mkdir -p build
	set -o pipefail; MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation -v -e ".[test,train,bench]" \
		> build/build.log 2>&1 || { tail -n 60 build/build.log; exit 1; }
	$(PYTHON) scripts/check_ptxas.py $(PTXAS_FLAGS) build/build.log
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q --benchmark-disable

demo: $(STAMP)
	$(PYTHON) -m fsq_kernels.train demo --out $(DEMO_OUT)

check: $(STAMP)
	$(PYTHON) -m fsq_kernels
	$(PYTHON) -m fsq_kernels check

bench: $(STAMP)
	$(PYTHON) -m benchmarks.report --quick --out $(BENCH_OUT)

clean:
	rm -rf build $(STAMP) fsq_kernels/*.so fsq_kernels/_build_info.py
