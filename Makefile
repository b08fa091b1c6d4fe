# The two entry points: `make demo` and `make test`. Both build .venv from scratch if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned first: on these machines 2.13.0 is a local CPU wheel; a bare `torch` would pull a CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test test-avx2 venv clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(BIN)/activate pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/rwkvpy demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

# The suite on an AVX2 machine's kernel paths (torch's, MKL's and oneDNN's instruction sets
# capped), for a developer on an AVX-512 CPU; not its memory system. Not part of `make test`.
test-avx2: $(VENV)/.installed-test
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
