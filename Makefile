# Two commands on a fresh clone: `make demo` and `make test`. Each creates
# .venv and installs shmpool (with its test extra) on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: demo test bench chaos clean-shm clean

$(STAMP): pyproject.toml
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
	rm -rf $(VENV) .venv-3.10 build *.egg-info .pytest_cache shmpool/_core/layout.h
