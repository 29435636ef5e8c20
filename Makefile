# The two set-up commands of the README. Both create .venv and install what they need.
#   make demo   the main job on the built-in example (offline, CPU, a few minutes)
#   make test   the test suite
# The training tools' own checks of loraplan's files (tests/test_tools_*.py, marked `tools`):
#   make tools-test           TRL 1.16, LLaMA-Factory 0.9.5, torchtune 0.6.1 in .venv-tools (~5 min, CI runs it)
#   make tools-axolotl-test   axolotl 0.21 in .venv-axolotl: Python >= 3.12 and PyPI's CUDA torch (~10 min, 5 GB)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU machine gets the CPU build of torch; a machine that already has torch keeps its own.
TORCH ?= torch==2.13.0

.PHONY: install demo test tools tools-test tools-axolotl-test

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

# LLaMA-Factory 0.9.5 pins transformers<=5.6, peft<=0.18.1, trl<=0.24, accelerate<=1.11: it goes in
# without its pins, beside loraplan's (the tests say what they shim). torchtune 0.6.1 needs torchao<=0.14,
# which PEFT 0.21 refuses once imported: both live in a folder put on PYTHONPATH for its tests alone.
TOOLS := .venv-tools
TORCHTUNE_061 := $(TOOLS)/torchtune-0.6.1

tools: $(TOOLS)/.installed

$(TOOLS)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --upgrade pip
	$(TOOLS)/bin/python -c "import torch" 2>/dev/null || $(TOOLS)/bin/python -m pip install -q $(TORCH)
	$(TOOLS)/bin/python -m pip install -q -c constraints.txt -e ".[test]" trl==1.16.0 omegaconf \
		torchdata==0.11.0 kagglehub sentencepiece tiktoken blobfile psutil Pillow
	$(TOOLS)/bin/python -m pip install -q --no-deps llamafactory==0.9.5
	$(TOOLS)/bin/python -m pip install -q --no-deps --target $(TORCHTUNE_061) torchtune==0.6.1 torchao==0.14.1
	touch $@

tools-test: tools
	$(TOOLS)/bin/python -m pytest -q -m tools tests/test_tools_trl.py tests/test_tools_llamafactory.py
	PYTHONPATH=$(TORCHTUNE_061) $(TOOLS)/bin/python -m pytest -q -m tools tests/test_tools_torchtune.py

# axolotl 0.21: Python 3.12 (PYTHON312), its own pins (transformers 5.20.1, peft 0.21.2, trl 1.14.1), no
# CPU build of torch for 3.12 on this disk (PyPI's CUDA one, ~4 GB); only what its config checks and
# LoRA loader import.
PYTHON312 ?= python3.12
AXOLOTL := .venv-axolotl

$(AXOLOTL)/.installed: pyproject.toml
	$(PYTHON312) -m venv $(AXOLOTL)
	$(AXOLOTL)/bin/python -m pip install -q --upgrade pip
	$(AXOLOTL)/bin/python -m pip install -q torch==2.13.0 transformers==5.20.1 peft==0.21.2 accelerate==1.15.0 \
		datasets==5.0.1 trl==1.14.1 tokenizers==0.23.3 bitsandbytes==0.50.2 posthog==6.7.11 addict \
		pydantic==2.13.5 pytest -e .
	$(AXOLOTL)/bin/python -m pip install -q --no-deps axolotl==0.21.0
	touch $@

tools-axolotl-test: $(AXOLOTL)/.installed
	$(AXOLOTL)/bin/python -m pytest -q -m tools tests/test_tools_axolotl.py
