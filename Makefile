# kvmsandbox: `make run` sets everything up, serves the CRI and runs a demo pod through it; `make test` sets everything up
# and runs the whole suite. Both are idempotent and work on a fresh Debian 12 machine as root.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
KVMSANDBOX := $(VENV)/bin/kvmsandbox

APT_PACKAGES := qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-dev \
	pkg-config gcc mmdebstrap busybox-static e2fsprogs erofs-utils cpio kmod docker-registry skopeo umoci \
	zstd openssl containernetworking-plugins iproute2 iptables

.PHONY: setup apt cni venv guest-image proto lint typecheck unit test conformance run doctor clean

setup: apt cni venv guest-image

apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
	@# The embedded libvirt driver refuses to start without the user its QEMU would run as, which only
	@# libvirt-daemon-system (and with it systemd) would create.
	@getent passwd libvirt-qemu >/dev/null || useradd --system --user-group --no-create-home --shell /usr/sbin/nologin libvirt-qemu

# A single-node bridge network for pods, unless the node already has a CNI config.
cni: apt
	@mkdir -p /etc/cni/net.d
	@if ! ls /etc/cni/net.d/*.conflist /etc/cni/net.d/*.conf /etc/cni/net.d/*.json >/dev/null 2>&1; then \
		install -m 644 images/cni/10-kvmsandbox.conflist /etc/cni/net.d/10-kvmsandbox.conflist; \
		echo "installed the default pod network /etc/cni/net.d/10-kvmsandbox.conflist (bridge kvsb0, 10.77.0.0/16)"; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11+ is needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

guest-image: venv
	$(KVMSANDBOX) guest-image build

proto: venv
	$(PY) -m kvmsandbox.tools.protogen

lint: venv
	$(VENV)/bin/ruff check kvmsandbox tests benchmarks conformance
	$(VENV)/bin/ruff format --check kvmsandbox tests benchmarks conformance

typecheck: venv
	$(VENV)/bin/mypy kvmsandbox

unit: venv
	$(PY) -m pytest -q tests/unit

test: setup lint typecheck
	$(PY) -m pytest -q -ra tests

# critest (cri-tools v1.36.0) against a real server: CRITEST=/path/to/critest CRICTL=/path/to/crictl.
# Builds and pushes the images critest pulls to a loopback registry; fails if any spec fails that
# conformance/skips.py does not name as not applicable to VM pods.
CRITEST ?= $(shell command -v critest 2>/dev/null)
CRICTL ?= $(shell command -v crictl 2>/dev/null)
conformance: setup
	$(PY) -m conformance.run --critest "$(CRITEST)" --crictl "$(CRICTL)"

# Serves the CRI on /run/kvmsandbox/kvmsandbox.sock and runs a demo pod through it; Ctrl-C stops
# serving (pods keep running, the next server recovers them).
run: setup
	$(KVMSANDBOX) doctor
	$(KVMSANDBOX) serve --demo

doctor: venv
	$(KVMSANDBOX) doctor

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
