# Two commands on a fresh Linux machine with Python >= 3.11 (and make):
#   make demo   set up .venv (the tool only) and run the main job on the demo corpus
#   make test   set up .venv with the test tools and run lint, types and the suite
# ARGS="..." is passed on (to cli.py for demo, to pytest for test).
# Each creates the environment on first use and again when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test clean

demo: $(VENV)/.installed
	$(BIN)/python cli.py --demo --threads 8 --procs 4 $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest $(ARGS)

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; v = sys.version_info; sys.exit(0 if v >= (3, 11) else f"downloader needs Python >= 3.11; $(PYTHON) is {v.major}.{v.minor} (try make PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) output
