# Two commands for a newcomer: `make demo` and `make test`. Both build .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test faults lint format clean-venv

$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[test,notebooks]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m didistill.demo --workdir=runs/demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -n 2 -q tests

# Randomized fault injection (kills, bit flips, truncated files) on real runs; prints a table.
faults: $(STAMP)
	$(PY) -m tests.faults.random_faults --runs 40 --budget_s 1200

clean-venv:
	rm -rf $(VENV)
