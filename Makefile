# The two set-up commands of the README: `make demo` and `make test` (lint, docs, pytest). Both install edgefed into
# .venv first (once; again when pyproject.toml changes). On a CPU machine the CPU build of
# PyTorch is pinned by constraints-cpu.txt; a GPU user runs `make test CONSTRAINTS=` after
# installing their own torch build into .venv.
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PYTHON ?= python3
BIN := $(VENV)/bin
# llama.cpp's AMX kernels crash in their first matrix product on some CPUs that have AMX
# (ggml-org/llama.cpp#20824; seen on this project's Intel Xeon machines): where the CPU has AMX,
# llama-cpp-python is compiled for it without them (the AVX-512 kernels stay); a CMAKE_ARGS of
# your own is kept. It is installed first, on its own, with --no-cache-dir: pip's wheel cache
# does not know build flags and could hand back a wheel built with AMX.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= $(CMAKE_ARGS) $(if $(shell grep -s -m1 -o amx_int8 /proc/cpuinfo),-DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)")
# the llama-cpp-python requirement as pyproject.toml states it
LLAMA_REQUIREMENT = $(shell $(PYTHON) -c "import tomllib; print(next(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if d.startswith('llama-cpp-python')))")

.PHONY: demo test test-fast lint docs bench

$(BIN)/edgefed-installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS='$(strip $(LLAMA_CMAKE_ARGS))' $(BIN)/python -m pip install --no-cache-dir \
		'$(LLAMA_REQUIREMENT)'
	$(BIN)/python -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test,docs]'
	touch $@

demo: $(BIN)/edgefed-installed
	$(BIN)/edgefed simulate

lint: $(BIN)/edgefed-installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# the documentation site into site/; --strict fails on a broken link, anchor or reference
docs: $(BIN)/edgefed-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: lint docs
	$(BIN)/python -m pytest

# a newcomer's first green run: the pure and quick tests, without the modules marked slow
test-fast: $(BIN)/edgefed-installed
	$(BIN)/python -m pytest -m 'not slow'

bench: $(BIN)/edgefed-installed
	$(BIN)/python bench/runtime.py
	$(BIN)/python bench/train.py
