# Two entry points for a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.tpas-installed

.PHONY: install test demo clean chromium

# Extra arguments for `tpas demo`, e.g. `make demo DEMO_ARGS="--no-serve --out runs/demo"`.
DEMO_ARGS ?=
# The browser test drives Debian's chromium (not a Playwright-downloaded browser).
CHROMIUM ?= /usr/bin/chromium
SUDO    := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch 2.13.0 first: these machines hold its CPU wheel; a bare `torch` requirement would pull CUDA.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install chromium
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/tpas demo $(DEMO_ARGS)

# Installs chromium when missing; if that fails the browser test fails loudly (it never skips).
chromium:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; } \
	  || echo "WARNING: could not install chromium; tests/test_browser.py will fail" >&2

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
