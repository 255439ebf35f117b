# Two entry points for a fresh machine: `make materialize` and `make test` (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
DAGSTER := $(VENV)/bin/dagster
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install materialize dev test lint bench

# torch is installed first, pinned: on this machine 2.13.0 is the local CPU wheel, while an
# unpinned resolve would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(DAGSTER_HOME):
	mkdir -p $@

# Layers whose neurons get explained, simulated and scored by `make materialize` (CPU: ~15 s per neuron).
EXPLAIN_LAYERS ?= 0...1

# Every stage of the configured model (NEURON_ATLAS_MODEL, default: embedded Gemma), in three runs:
# the unpartitioned stages; all layer partitions of the records in ONE run (one forward pass);
# explanations, simulations, scores and ablations for EXPLAIN_LAYERS.
materialize: install | $(DAGSTER_HOME)
	$(DAGSTER) asset materialize -m assets.definitions --select subject_model,corpus_tokens
	$(DAGSTER) asset materialize -m assets.definitions --select activation_records,top_k_examples \
		--partition-range "0...$$($(PY) -m assets.layers last)"
	$(DAGSTER) asset materialize -m assets.definitions --select explanations,simulations,scores,ablations,neuron_viewer \
		--partition-range "$(EXPLAIN_LAYERS)"

dev: install | $(DAGSTER_HOME)
	$(DAGSTER) dev -w workspace.yaml

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: install
	$(PY) -m bench.capture
	$(PY) -m bench.simulate
	$(PY) -m bench.ablate
