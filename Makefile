# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Pinned: on the development machine pip finds this release's CPU wheel on disk; a bare `torch`
# (or a range) would make pip download a newer, multi-GB CUDA build there.
TORCH_PIN ?= torch==2.13.0
# Where that torch comes from: PyPI by default (its Linux wheel is the CUDA build); for example
# `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu` for the CPU build.
TORCH_INDEX ?=
# `make demo VENV_FLAGS=--system-site-packages` builds .venv on the interpreter's packages, so
# a torch already installed there (a CUDA build, say) is used, not installed again.
VENV_FLAGS ?=

.PHONY: install install-test demo test lint clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PIP) install -q "pip>=21.3"  # editable installs from pyproject.toml alone
	$(PY) -c "import torch" 2>/dev/null || \
		$(PIP) install -q "$(TORCH_PIN)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.torch pyproject.toml
	$(PIP) install -q -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/sparsetrain demo

test: install-test
	$(PY) -m pytest -q tests

lint: install-test
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
