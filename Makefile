# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs requirements.txt the first time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

demo: setup
	$(BIN)/python demo.py

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo_output
