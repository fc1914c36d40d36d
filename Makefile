# SecondSite developer entry points. `make demo` and `make test` work on a fresh Debian machine:
# they install what is missing (Debian packages, a virtualenv, the Kubernetes binaries) first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEBS := qemu-utils qemu-system-common nbdkit libnbd-bin openssl iproute2
PYTEST_ARGS ?=

.PHONY: deps debs venv k8s-binaries pulumi-engine test unit lint crds demo demo-down clean

deps: debs venv

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,pulumi]'
	touch $@

venv: $(VENV)/.installed

k8s-binaries: venv
	$(PY) -m secondsite devcluster build

# The Pulumi CLI and kubernetes plugin for the pulumi_engine tests (secondsite/devcluster/pulumi_build.py).
pulumi-engine: venv
	$(PY) -m secondsite.devcluster.pulumi_build

test: deps k8s-binaries pulumi-engine
	$(PY) -m secondsite crds --check
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

unit: venv
	$(PY) -m pytest -p no:cacheprovider tests/unit $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check secondsite tests
	$(VENV)/bin/ruff format --check secondsite tests
	$(VENV)/bin/mypy

crds: venv
	$(PY) -m secondsite crds

demo: deps k8s-binaries
	$(PY) -m secondsite demo

demo-down: venv
	$(PY) -m secondsite devcluster down

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
