# The two set-up commands of the README: `make demo` and `make test`. Both install edgefed into
# .venv first (once; again when pyproject.toml changes). On a CPU machine the CPU build of
# PyTorch is pinned by constraints-cpu.txt; a GPU user runs `make test CONSTRAINTS=` after
# installing their own torch build into .venv.
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint bench

$(BIN)/edgefed-installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[test]'
	touch $@

demo: $(BIN)/edgefed-installed
	$(BIN)/edgefed simulate

lint: $(BIN)/edgefed-installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

test: lint
	$(BIN)/python -m pytest

bench: $(BIN)/edgefed-installed
	$(BIN)/python bench/runtime.py
	$(BIN)/python bench/train.py
