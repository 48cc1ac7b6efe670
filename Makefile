# Set-up and checks. Every target creates the virtual environment in .venv first;
# it is rebuilt only when pyproject.toml changes, so repeated runs start at once.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUTPUT ?= demo-output

.PHONY: setup demo test test-slow lint format

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Generate the offline demo collection, prepare, train, label and evaluate it.
demo: $(STAMP)
	$(BIN)/herbray demo --output $(DEMO_OUTPUT)

# The default test run: unit and integration tests, slow real-data runs excluded.
test: $(STAMP)
	$(BIN)/python -m pytest

# Only the tests marked slow (fine-tuning and labeling on the real sets).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .
