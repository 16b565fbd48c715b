# Two commands for a newcomer: `make demo` and `make test`. Both build .venv when needed,
# with the exact versions of requirements/lock.txt (docs/install.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
# `make test-oldest`: the lowest versions setup.cfg allows, in a separate environment.
OLDEST_VENV := .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_STAMP := $(OLDEST_VENV)/.installed
OLDEST := requirements/oldest.txt
# The smoke subset: divergences, a toy engine run with preemption and resume, one text
# distillation step, one image distillation step, the XLA:CPU rule, the compat shims, workdir
# files through etils.epath (a fake gs:// and the object-store code on a local path).
OLDEST_TESTS := tests/test_f_divergences.py::TestRegistry \
	tests/test_train_loop.py::test_preempted_run_resumes_bit_identically \
	"tests/test_didi.py::test_two_jitted_steps_are_finite_and_move_the_student[distill0]" \
	"tests/test_one_step_images.py::test_every_method_steps_under_jit[jensen_shannon-0]" \
	tests/test_xla_cpu.py tests/test_install.py::test_compat_enable_x64 \
	tests/test_writers.py::test_tensorboard_writes_event_files_with_every_scalar \
	tests/test_workdir_files.py

.PHONY: demo test test-oldest faults lint format clean-venv

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -c $(LOCK) -e '.[test,notebooks]'
	@touch $(STAMP)

$(OLDEST_STAMP): setup.cfg pyproject.toml $(OLDEST)
	@test -x $(OLDEST_PY) || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(OLDEST_PY) -m pip install --quiet -c $(OLDEST) -e '.[test]'
	@touch $(OLDEST_STAMP)

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
	$(PY) -m tests.faults.random_faults --runs 40 --budget_s 1500

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_PY) -m pip check
	$(OLDEST_PY) -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

clean-venv:
	rm -rf $(VENV) $(OLDEST_VENV)
