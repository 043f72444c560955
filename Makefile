# Each target sets itself up: a local .venv with the extras it needs, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info
