# acomp developer commands. `make test` is what CI runs (.ci/run); `make demo` is the main job on the
# embedded default (stdlib corpus, tiny model, CPU).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: venv test lint demo clean-venv

venv: $(VENV)/.installed

# torch + torchvision first, pinned by constraints.txt (see the comment there), then the package.
$(VENV)/.installed: setup.cfg constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch torchvision
	$(PIP) install -q -c constraints.txt -e '.[dev,zst]'
	touch $@

test: venv
	$(BIN)/ruff check .
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q tests

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

demo: venv
	DS_ACCELERATOR=cpu $(BIN)/python launchers/demo.py

clean-venv:
	rm -rf $(VENV)
