# Two entry points do all set-up on a fresh Debian/Ubuntu machine:
#   make run    installs what is missing, then trains resnet at width 16 on the embedded default
#   make test   installs what is missing, then runs the test suite
# Re-running skips what is already installed.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM_PYTHON := /usr/bin/python3
STAMP := $(VENV)/.installed
APT_PACKAGES := python3-graph-tool python3-venv
PORT ?= 5001
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test lint format bench population predictor serve predict ui clean

setup: $(STAMP)

# graph-tool is not on PyPI: it comes from Debian's python3-graph-tool, and the venv sees it
# through --system-site-packages. conda users: `conda install -c conda-forge graph-tool`.
.system-deps:
	@if ! $(SYSTEM_PYTHON) -c "import graph_tool, ensurepip" >/dev/null 2>&1; then \
	  if [ "$$(id -u)" -ne 0 ]; then \
	    echo "mlflow_tg needs Debian's $(APT_PACKAGES) and is not running as root. Run:" >&2; \
	    echo "  sudo apt-get update && sudo apt-get install -y $(APT_PACKAGES)" >&2; \
	    echo "then run make again (conda users: conda install -c conda-forge graph-tool)." >&2; \
	    exit 1; \
	  fi; \
	  echo "Installing $(APT_PACKAGES) with apt-get (about a minute)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi
	@touch $@

# pyvenv.cfg, not bin/python: that is a symlink, and make would see the system python's age.
$(VENV)/pyvenv.cfg: .system-deps
	$(SYSTEM_PYTHON) -m venv --system-site-packages $(VENV)

# One resolve for everything, so that numpy<2 (needed by graph-tool) holds for every package.
$(STAMP): pyproject.toml $(VENV)/pyvenv.cfg
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import graph_tool, torch, mlflow, catboost, polars; print('environment ready')"
	@touch $@

run: setup
	$(PY) train.py model=resnet width=16

test: setup
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

bench: setup
	$(PY) bench/epoch_time.py
	$(PY) bench/graph_capture.py
	$(PY) bench/predictor_quality.py

population: setup
	$(PY) train.py -m +experiment=population

predictor: setup
	$(PY) -m mlflow_tg.predictor

serve: setup
	MLFLOW_TRACKING_URI=sqlite:///mlflow.db mlflow models serve \
	  -m "models:/tg-performance-predictor@champion" --env-manager local -h 127.0.0.1 -p $(PORT)

# make predict RUN=<run id> [ENDPOINT=http://127.0.0.1:5001]
predict: setup
	$(PY) -m mlflow_tg.serve.cli predict --run-id "$(RUN)" $(if $(ENDPOINT),--endpoint $(ENDPOINT))

ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow.db

clean:
	rm -rf $(VENV) .system-deps *.egg-info
