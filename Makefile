# make test   : create .venv if missing, install grng with its test extras, run the linters
#               (ruff, mypy, tools/check_structure.py: file/function size, import cycles) and pytest
# make bench  : the project's main job (benchmarks, default suite)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= -q

.PHONY: test lint bench venv consistency

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip

venv: $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[test]"

lint: venv
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) tools/check_structure.py

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[test,bench]"
	$(PY) -m benchmarks $(BENCH_ARGS)

consistency: venv
	$(PY) -m grng_core.consistency
