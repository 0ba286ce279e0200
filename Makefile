# The developer loop is CI's loop: README, .ci/run and developers all run `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv

.PHONY: setup lock controlplane tools lint typecheck test test-fast up crd bench clean

$(PY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet uv

# Install exactly what requirements/dev.lock pins (hash-checked), then the project itself, editable.
setup: $(PY)
	$(UV) pip install --quiet --python $(PY) --require-hashes -r requirements/dev.lock
	$(UV) pip install --quiet --python $(PY) --no-deps --require-hashes -r requirements/nodeps.lock
	$(UV) pip install --quiet --python $(PY) --no-deps -e .

# Re-pin after changing dependencies in pyproject.toml.
lock: $(PY)
	$(UV) pip compile pyproject.toml --extra dev --extra local --generate-hashes --python-version 3.11 \
		-o requirements/dev.lock

# Build (first time only, then cached) the real etcd + kube-apiserver from Go modules; fetch KubeRay's
# published CRDs and build its validation checks (deploy/kuberay) the same way.
controlplane: setup
	$(PY) -c "from shared.local.controlplane import ensure_binaries; ensure_binaries()"
	$(PY) -m shared.local.kuberay

crd: setup
	$(PY) -m shared.api.crd

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy

# Debian tools the tests drive: the OCI registry the tuning job pushes to, and ss (iproute2).
tools:
	@command -v docker-registry >/dev/null && command -v ss >/dev/null || \
		apt-get install -y -q docker-registry iproute2 >/dev/null || \
		{ echo "install Debian's docker-registry and iproute2 (apt-get install docker-registry iproute2)"; exit 1; }

# Everything: lint, strict types, then every test against real NATS, etcd, kube-apiserver and kubectl.
test: lint typecheck controlplane tools
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not controlplane and not slow"

# The local system, in the background (`kaiten status`, `kaiten down`). Without docker-registry it still
# runs; only the tuning examples, which push to the local registry, need it.
up: setup controlplane
	-@$(MAKE) --no-print-directory tools
	$(VENV)/bin/kaiten up

bench: setup
	$(PY) benchmarks/bus_throughput.py
	$(PY) benchmarks/plan_catalog.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/tuning.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
