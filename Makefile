# The developer loop is CI's loop: README, .ci/run and developers all run `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
# Each phase appends "name seconds" to $KAITEN_PHASE_LOG when it is set (.ci/run prints the table).
TIMED  := .ci/timed

.PHONY: setup lock controlplane kuberay node tools up-tools lint typecheck test test-fast up crd bench clean

$(PY):
	$(TIMED) setup python3 -m venv $(VENV)
	$(TIMED) setup $(VENV)/bin/pip install --quiet uv

# Install exactly what requirements/dev.lock pins (hash-checked), then the project itself, editable.
setup: $(PY)
	$(TIMED) setup $(UV) pip install --quiet --python $(PY) --require-hashes -r requirements/dev.lock
	$(TIMED) setup $(UV) pip install --quiet --python $(PY) --no-deps --require-hashes -r requirements/nodeps.lock
	$(TIMED) setup $(UV) pip install --quiet --python $(PY) --no-deps -e .

# Re-pin after changing dependencies in pyproject.toml.
lock: $(PY)
	$(UV) pip compile pyproject.toml --extra dev --extra local --generate-hashes --python-version 3.11 \
		-o requirements/dev.lock
	$(UV) pip compile pyproject.toml --extra azure --generate-hashes --python-version 3.11 \
		-c requirements/dev.lock -o requirements/services.lock
	$(UV) pip compile pyproject.toml --extra serving --extra tuning --generate-hashes --python-version 3.11 \
		-c requirements/dev.lock -o requirements/ray.lock
	$(UV) pip compile requirements/nats.in --generate-hashes --python-version 3.11 \
		-c requirements/dev.lock -o requirements/nats.lock

# Build (first time only, then cached) the real etcd + kube-apiserver from Go modules: what `kaiten up` runs.
# It needs only Go and python3's standard library, so `make up` runs it while pip installs (a cold
# machine's two longest steps, side by side).
controlplane:
	$(TIMED) build-controlplane python3 -c \
		"import sys; sys.path.insert(0, '.'); from kaiten.local.controlplane import ensure_binaries; ensure_binaries()"

# For the tests only: KubeRay's published CRDs, and its validation checks (deploy/kuberay) built the same way.
kuberay: setup
	$(TIMED) build-kuberay $(PY) -m kaiten.local.kuberay

# For the tests only: a real node (kaiten/local/node.py): kube-controller-manager, kube-scheduler and the
# kubelet from the same Go module, KubeRay's operator and Helm from their own, and the images built offline
# from deploy/images/*.Dockerfile (needs Debian's containerd, runc, buildah and mmdebstrap: `make tools`).
node: setup tools
	$(TIMED) build-node $(PY) -c "from kaiten.local.controlplane import ensure_binaries; ensure_binaries(node=True)"
	$(TIMED) build-kuberay $(PY) -m kaiten.local.kuberay --operator
	$(TIMED) build-node $(PY) -m kaiten.local.gotools
	$(TIMED) build-images $(PY) -m kaiten.local.images pause services ray nats

crd: setup
	$(PY) -m shared.api.crd

lint: setup
	$(TIMED) lint $(VENV)/bin/ruff check .
	$(TIMED) lint $(VENV)/bin/ruff format --check .
	$(TIMED) lint $(VENV)/bin/lint-imports

typecheck: setup
	$(TIMED) types $(VENV)/bin/mypy

# Debian tools the tests drive: the OCI registry the tuning job pushes to, ss (iproute2), and the node's
# container runtime and image builders.
DEBIAN_TOOLS := docker-registry iproute2 containerd runc containernetworking-plugins buildah mmdebstrap
tools:
	@( for bin in docker-registry ss containerd runc ctr buildah mmdebstrap /usr/lib/cni/loopback; do \
		command -v $$bin >/dev/null || exit 1; done ) || \
		apt-get install -y -q $(DEBIAN_TOOLS) >/dev/null || \
		{ apt-get update -q && apt-get install -y -q $(DEBIAN_TOOLS) >/dev/null; } || \
		{ echo "install Debian's tools: apt-get install $(DEBIAN_TOOLS)"; exit 1; }

# What `kaiten up` takes from Debian: the OCI registry of the tuning examples.
up-tools:
	@command -v docker-registry >/dev/null || apt-get install -y -q docker-registry >/dev/null || \
		{ echo "the tuning examples push to Debian's docker-registry: apt-get install docker-registry"; exit 1; }

# Everything: lint, strict types, then every test against real NATS, etcd, kube-apiserver, kubectl and the
# single-node cluster.
test: lint typecheck controlplane kuberay node tools
	$(TIMED) tests $(PY) -m pytest --durations=10

test-fast: setup
	$(PY) -m pytest -m "not controlplane and not cluster and not slow"

# The local system, in the background (`kaiten status`, `kaiten down`). Without docker-registry it still
# runs; only the tuning examples, which push to the local registry, need it.
up:
	@$(MAKE) --no-print-directory -j2 setup controlplane
	-@$(MAKE) --no-print-directory up-tools
	$(VENV)/bin/kaiten up

# KAITO_SRC=DIR (a KAITO checkout) adds KAITO's workspace controller to the control-plane comparison.
BENCH_SIZES ?= 1,100,500
bench: setup controlplane
	$(PY) benchmarks/bus_throughput.py
	$(PY) benchmarks/control_plane.py --sizes $(BENCH_SIZES) $(if $(KAITO_SRC),--kaito-src $(KAITO_SRC))
	$(PY) benchmarks/plan_catalog.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/tuning.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
