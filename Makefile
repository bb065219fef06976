# Two commands do all set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
ARGS ?=

.PHONY: install train test test-cluster test-all clean

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

## The fast suite (tests marked slow or cluster excluded; `make test-all` runs everything).
test: $(INSTALLED)
	$(BIN)/python -m pytest -m "not slow and not cluster" $(ARGS)

## Sweeps against real services: a one-node SLURM (launchers/slurm_local_up.sh; root, Debian's packages), MLflow
## servers, submitit, and headless Chromium for the MLflow UI. Without root or apt the SLURM tests skip and say why.
test-cluster: $(INSTALLED)
	command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	$(BIN)/python -m pytest -m cluster $(ARGS)

test-all: $(INSTALLED)
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun mlflow.db mlruns .pytest_cache
