# Two commands do everything on a fresh machine (Python 3.11, no GPU, nothing installed):
#   make demo   trains the FSQ tokenizer + MaskGIT demo on the built-in data (the main job)
#   make test   runs the test suite (what CI runs)
# Both install torch and build the extension first (once; `make install` alone does just that).

PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_VERSION ?= 2.14.1
DEMO_OUT ?= runs/demo
STAMP := .build-stamp

.PHONY: install test demo bench clean

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*)
	$(PIP) install --quiet "torch==$(TORCH_VERSION)"
	$(PIP) install --quiet setuptools wheel ninja pybind11
	$(PIP) install --no-build-isolation -e ".[test,train,bench]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q --benchmark-disable

demo: $(STAMP)
	$(PYTHON) examples/quickstart.py

clean:
	rm -rf build $(STAMP) fsq_kernels/*.so
