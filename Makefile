# The two set-up commands of the README. Both create .venv and install what they need.
#   make demo          the main job on the built-in example (offline, CPU, a few minutes)
#   make test          the test suite, on the pinned transformers/PEFT/accelerate (constraints.txt)
#   make test-newest   the exactness tests again on the newest transformers/PEFT/accelerate (.venv-newest)
# The training tools' own checks of loraplan's files (tests/test_tools_*.py, marked `tools`):
#   make tools-test           TRL 1.16, LLaMA-Factory 0.9.5, torchtune 0.6.1 in .venv-tools (~5 min, CI runs it)
#   make tools-axolotl-test   axolotl 0.21 in .venv-axolotl: Python >= 3.12 and PyPI's CUDA torch (~10 min, 5 GB)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU machine gets the CPU build of torch; a machine that already has torch keeps its own.
TORCH ?= torch==2.13.0

NEWEST := .venv-newest
# What a transformers or PEFT release can change: which weights PEFT adapts, and so every count.
EXACTNESS_TESTS := tests/test_every_architecture.py tests/test_count_vs_peft.py tests/test_targets.py

.PHONY: install demo test test-newest tools tools-test tools-axolotl-test

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

# A second venv with no constraints: pip takes the newest releases (torch is the same local wheel).
$(NEWEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install -q --upgrade pip
	$(NEWEST)/bin/python -c "import torch" 2>/dev/null || $(NEWEST)/bin/python -m pip install -q $(TORCH)
	$(NEWEST)/bin/python -m pip install -q -e ".[test]"
	$(NEWEST)/bin/python -m pip install -q --upgrade transformers peft accelerate
	touch $@

test-newest: $(NEWEST)/.installed
	$(NEWEST)/bin/python -c "from importlib.metadata import version as v; print('newest:', *(f'{p} {v(p)}' for p in ('transformers', 'peft', 'accelerate')))"
	$(NEWEST)/bin/python -m pytest -q $(EXACTNESS_TESTS)
# The training tools' own checks of loraplan's files (tests/test_tools_*.py, marked `tools`):
#   make tools-test           TRL 1.16, LLaMA-Factory 0.9.5, torchtune 0.6.1 in .venv-tools (~5 min, CI runs it)
#   make tools-axolotl-test   axolotl 0.21 in .venv-axolotl: Python >= 3.12 and PyPI's CUDA torch (~10 min, 5 GB)
