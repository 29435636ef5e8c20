# The two set-up commands of the README. Both create .venv and install what they need.
#   make demo   the main job on the built-in example (offline, CPU, a few minutes)
#   make test   the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU machine gets the CPU build of torch; a machine that already has torch keeps its own.
TORCH ?= torch==2.13.0

.PHONY: install demo test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

demo: install
	$(BIN)/loraplan demo

test: install
	$(BIN)/python -m pytest -q
