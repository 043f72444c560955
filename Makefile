# Each target sets itself up: a local .venv with the extras it needs, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench gpu-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# One stamp per set of extras, redone when pyproject.toml changes.
$(VENV)/.stamp-%: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[$(subst +,$(comma),$*)]'
	touch $@

comma := ,

# Tests and bench compare against PyTorch: the CPU build, pinned.
$(VENV)/.stamp-torch: | $(VENV)/bin/python
	$(PY) -m pip install -q torch==2.13.0
	touch $@

# The test extra holds opacus, which takes any torch >= 2.6: torch goes in first, so the
# pinned build satisfies it and no other torch is pulled.
$(VENV)/.stamp-test: | $(VENV)/.stamp-torch

demo: $(VENV)/.stamp-plot
	$(PY) examples/exploding_rnn.py

test: $(VENV)/.stamp-test $(VENV)/.stamp-torch
	$(PY) -m pytest -q

bench: $(VENV)/.stamp-test $(VENV)/.stamp-torch
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/gpu.py --host

# On a machine with an NVIDIA GPU whose python3 already holds numba-cuda, CuPy and a CUDA
# build of torch (no network needed): the GPU tests on the device, then the GPU bench.
GPU_JSON ?= bench/results/gpu/latest.json
gpu-check:
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	mkdir -p $(dir $(GPU_JSON))
	NUMBA_ENABLE_CUDASIM=0 $(PYTHON) -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_cuda_stateful.py tests/test_private_cuda.py; \
	tests=$$?; $(PYTHON) bench/gpu.py --quick --json $(GPU_JSON) && exit $$tests

clean:
	rm -rf $(VENV) build *.egg-info
