# wsimil: `make demo` and `make test` work on a fresh clone (they create .venv when missing).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.wsimil-installed
DEMO_OUT ?= demo_run
PYTEST_ARGS ?=

.PHONY: setup demo test lint format clean slurm-test hadolint docker-test

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Pinned versions that work together (torch 2.14.1 + torchvision 0.29.1, ...).
	$(PY) -m pip install --quiet -c requirements.lock -e '.[dev,weights,pipelines]'
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install wsimil with pinned dependencies

demo: $(STAMP) ## sample cohorts: tile, embed, 5-fold CV train on one; predict and heatmap an unlabelled one
	$(VENV)/bin/wsimil demo --out $(DEMO_OUT)

test: $(STAMP) ## run the test suite
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check wsimil tests
	$(VENV)/bin/ruff format --check wsimil tests

format: $(STAMP)
	$(VENV)/bin/ruff format wsimil tests
	$(VENV)/bin/ruff check --fix wsimil tests

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache

slurm-test: $(STAMP) ## one-node Slurm on localhost (root; installs slurm, munge, MariaDB) running pipelines/Snakefile
	command -v slurmctld >/dev/null && command -v mariadbd >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server; }
	bash scripts/slurm_local.sh

hadolint: $(STAMP) ## lint docker/Dockerfile
	$(VENV)/bin/hadolint docker/Dockerfile

docker-test: $(STAMP) ## build docker/Dockerfile with podman from a local Debian base and run a tiny cohort in it (root; installs podman, runc, debootstrap)
	command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap fuse-overlayfs; }
	bash docker/build_test.sh
