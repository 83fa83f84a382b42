# Two entry points for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.tpas-installed

.PHONY: install test demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch 2.13.0 first: these machines hold its CPU wheel; a bare `torch` requirement would pull CUDA.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/tpas demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
