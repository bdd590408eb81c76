# Two commands on a fresh clone: `make demo` and `make test`. Each creates
# .venv and installs shmpool (with its test extra) on first use. Another
# interpreter: make test PYTHON=python3.12 VENV=.venv-3.12 (.ci/run does this
# for every CPython from 3.10 up that the machine has).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: demo test bench chaos clean-shm clean

# The install builds the C core in place (shmpool/_core.cpython-3XX-*.so), so a
# change to its sources reinstalls too: no suite runs on a stale build.
$(STAMP): pyproject.toml setup.py shmpool/_layout.py $(wildcard shmpool/_core/*.c shmpool/_core/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shmpool-demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) tools/bench.py $(ARGS)

# Remove every pool left in /dev/shm by an interrupted run (of this user).
clean-shm: $(STAMP)
	$(PY) tools/cleanup.py $(ARGS)

clean:
	rm -rf $(VENV) .venv .venv-* build *.egg-info .pytest_cache shmpool/_core/layout.h
