# Two commands do all set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
ARGS ?=

.PHONY: install train test test-all clean

install: $(INSTALLED)

# Re-install when the declared dependencies change.
$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

## The embedded default: the CPU demo on synthetic identities (extra Hydra overrides via ARGS="key=value ...").
train: $(INSTALLED)
	$(BIN)/arcface-train $(ARGS)

## The whole suite CI runs (tests marked slow excluded; `make test-all` includes them).
test: $(INSTALLED)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

test-all: $(INSTALLED)
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun mlflow.db .pytest_cache
