# reelforge developer loop. Two commands do everything on a fresh machine:
#   make demo   set up .venv + demo data, then run the whole training pipeline (KFP local runner)
#   make test   same set-up, then the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= work/demo
RECIPE ?= demo
# torch is pinned to 2.13.0. On a CPU-only host elsewhere, point pip at the CPU wheels so it does
# not pull the multi-GB CUDA build: make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.reelforge-installed
TUXPAINT := /usr/share/tuxpaint/stamps
export MLFLOW_DISABLE_TELEMETRY=true
export DO_NOT_TRACK=true
export DVC_NO_ANALYTICS=1

.PHONY: manifests demo test setup demo-data compile lint clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --quiet --upgrade pip
	$(BIN)/pip install --quiet --quiet -c requirements/constraints.txt torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet --quiet -c requirements/constraints.txt -e '.[test]'
	$(BIN)/pip install --quiet --quiet -c requirements/constraints.txt --no-deps vbench  # evaluation prompts only
	touch $@

setup: $(STAMP) demo-data  ## create .venv and install the project and the demo data

demo-data:  ## install the Tux Paint stamps (Debian package tuxpaint-stamps-default)
	@if [ ! -d $(TUXPAINT) ]; then \
	  echo "installing demo data: Debian package tuxpaint-stamps-default"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq tuxpaint-stamps-default >/dev/null; \
	fi
	@test -d $(TUXPAINT) || { echo "demo data missing: $(TUXPAINT)"; exit 1; }

demo: setup  ## run the whole training pipeline on the demo recipe
	$(BIN)/reelforge run --recipe $(RECIPE) --workdir $(WORKDIR)

test: setup  ## run the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

compile: $(STAMP)  ## write the pipelines' IR YAML to build/pipelines
	$(BIN)/reelforge compile --out build/pipelines

manifests: $(STAMP)  ## render infra/k8s overlays into build/k8s and check them (schemas + policy)
	@mkdir -p build/k8s
	@for overlay in dev prod; do kubectl kustomize infra/k8s/overlays/$$overlay > build/k8s/$$overlay.yaml || exit 1; done
	$(BIN)/python -c "import sys, yaml; from components.kube import schema, policy; \
	objs = [o for f in ('build/k8s/dev.yaml', 'build/k8s/prod.yaml') for o in yaml.safe_load_all(open(f)) if o]; \
	problems = schema.validate_objects(objs, custom_kinds=['TrainingRuntime']) + [str(v) for v in policy.check(objs)]; \
	print('\n'.join(problems) or f'{len(objs)} objects: valid and within policy'); sys.exit(bool(problems))"

clean:  ## remove the venv and demo outputs
	rm -rf $(VENV) work build .pytest_cache
