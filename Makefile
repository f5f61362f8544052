# Two entry points do all set-up on a fresh Debian/Ubuntu machine:
#   make run    installs what is missing, then trains resnet at width 16 on the embedded default
#   make test   installs what is missing, then runs the test suite
# Re-running skips what is already installed.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SYSTEM_PYTHON := /usr/bin/python3
STAMP := $(VENV)/.installed
# chromium (+ fonts): the headless browser of the slow UI test (tests/test_ui.py)
APT_PACKAGES := python3-graph-tool python3-venv chromium fonts-liberation
PORT ?= 5001
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test test-slow lint format bench population offgrid offgrid2 offgrid3 hard-population hard-offgrid hard-offgrid2 hard-offgrid3 pruned-sweep predictor serve predict ui clean \
	server-start server-stop server-status bench-scale

setup: $(STAMP)

# graph-tool is not on PyPI: it comes from Debian's python3-graph-tool, and the venv sees it
# through --system-site-packages. conda users: `conda install -c conda-forge graph-tool`.
.system-deps:
	@if ! $(SYSTEM_PYTHON) -c "import graph_tool, ensurepip" >/dev/null 2>&1 \
	    || ! command -v chromium >/dev/null 2>&1; then \
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

# The slow tier, which `make test` leaves out (pyproject's -m 'not slow'): the session population
# and its fitted predictor, servers, end-to-end train.py runs. pytest exits 5 when it collects
# no test: not a failure here.
test-slow: setup
	$(PY) -m pytest -m slow || [ $$? -eq 5 ]

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .

bench: setup
	$(PY) bench/epoch_time.py
	$(PY) bench/graph_capture.py
	$(PY) bench/predictor_quality.py
	$(PY) bench/pruning.py

# The predictor's population, both cores (joblib launcher, one thread per job), then the sweep
# off its grid that scores it out of population.
population: setup
	$(PY) train.py -m +experiment=population hydra/launcher=joblib hydra.launcher.n_jobs=2

offgrid: setup
	$(PY) train.py -m +experiment=offgrid hydra/launcher=joblib hydra.launcher.n_jobs=2

# A second, independent sweep off the population's grid (72 runs): no value shared with the first.
offgrid2: setup
	$(PY) train.py -m +experiment=offgrid2 hydra/launcher=joblib hydra.launcher.n_jobs=2

# A third (72 runs): no seed or learning rate shared with the other two.
offgrid3: setup
	$(PY) train.py -m +experiment=offgrid3 hydra/launcher=joblib hydra.launcher.n_jobs=2

# VGG with BatchNorm only, where the configuration does not decide the outcome (192 runs).
hard-population: setup
	$(PY) train.py -m +experiment=hard hydra/launcher=joblib hydra.launcher.n_jobs=2

# The sweep off the hard population's grid that scores its predictor out of population (128 runs).
hard-offgrid: setup
	$(PY) train.py -m +experiment=hard_offgrid hydra/launcher=joblib hydra.launcher.n_jobs=2

# A second, independent sweep off that grid (128 runs): no value shared with the first.
hard-offgrid2: setup
	$(PY) train.py -m +experiment=hard_offgrid2 hydra/launcher=joblib hydra.launcher.n_jobs=2

# A third, independent of both (128 runs).
hard-offgrid3: setup
	$(PY) train.py -m +experiment=hard_offgrid3 hydra/launcher=joblib hydra.launcher.n_jobs=2

predictor: setup
	$(PY) -m mlflow_tg.predictor

serve: setup
	$(VENV)/bin/mlflow-tg serve --port $(PORT)

# make predict RUN=<run id> [ENDPOINT=http://127.0.0.1:5001]
predict: setup
	@test -n "$(RUN)" || { echo "make predict needs the run: make predict RUN=<run id> [ENDPOINT=http://127.0.0.1:5001] (a run id from the MLflow UI: make ui)" >&2; exit 2; }
	$(PY) -m mlflow_tg.serve.cli predict --run-id "$(RUN)" $(if $(ENDPOINT),--endpoint $(ENDPOINT))

# Opens on the runs when the URL says so: the UI of MLflow 3.17 defaults to its GenAI views.
ui: setup
	@echo "open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	mlflow ui --backend-store-uri sqlite:///mlflow.db

# A small sweep pruned live on both cores, next to the same sweep unpruned (needs a champion).
pruned-sweep: setup
	$(PY) bench/pruned_sweep.py

# A tracking server for parallel sweeps (python train.py tracking=server …), in
# mlflow_tg/tracking/server.py:
#   make server-start [SERVER_PORT=5000]
#     starts Debian's PostgreSQL (installs `postgresql` with apt when it is missing: as root,
#     else prints the sudo line), creates the role and database mlflow_tg when absent (password
#     $MLFLOW_TG_DB_PASSWORD, default mlflow_tg: local use only, PostgreSQL listens on
#     127.0.0.1), then runs `mlflow server` on it in the background at
#     http://127.0.0.1:$SERVER_PORT with 2 workers; pid, log (mlflow.log) and artifacts in
#     .server/ (git-ignored). Returns once /health answers; fails with the log's end otherwise.
#   make server-stop      stops the MLflow server, and PostgreSQL if server-start started it
#   make server-status    pid, URL and health as JSON (exit 1 when it does not answer)
#   make server-start AUTH=1   the same with MLflow's basic auth: the admin password comes
#     from $MLFLOW_TG_ADMIN_PASSWORD (required, 12 characters at least; admin user
#     $MLFLOW_TG_ADMIN_USER, default admin); clients set MLFLOW_TRACKING_USERNAME/PASSWORD.
SERVER_PORT ?= 5000
server-start: setup
	$(PY) -m mlflow_tg.tracking.server start --port $(SERVER_PORT) $(if $(AUTH),--auth)

server-stop:
	$(PY) -m mlflow_tg.tracking.server stop --port $(SERVER_PORT)

server-status:
	$(PY) -m mlflow_tg.tracking.server status --port $(SERVER_PORT)

# 8 and 16 concurrent jobs on the PostgreSQL-backed server (restarted once mid-sweep) and on
# the embedded SQLite store, every metric counted; then joblib against sequential. Needs root
# and Debian's PostgreSQL (a throwaway cluster); bench/scale.py --no-server skips that part.
bench-scale: setup
	$(PY) bench/scale.py

clean:
	rm -rf $(VENV) .system-deps *.egg-info
