# Two set-up commands for a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEB_PACKAGES := erofs-utils qemu-system-x86 skopeo docker-registry e2fsprogs containerd runc debootstrap iproute2 librust-blake3-dev libzstd-dev liblz4-dev libffi-dev
STAMP := $(VENV)/.installed

.PHONY: demo test lint peers deps venv bench clean

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $$missing >/dev/null; \
	fi

# setup.py also generates fscached/_proto/ from proto/: a changed .proto installs again
$(STAMP): pyproject.toml setup.py $(wildcard native/*.c native/*.h native/build_native.py) $(shell find proto -name '*.proto')
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# A real container's cold start three ways (classic pull, lazy, lazy + start-up profile) over a
# shaped network, with a table and a chart: coldstart/demo.py.
demo: deps venv
	$(PY) -m coldstart.peers install containerd-nydus-grpc nerdctl
	$(PY) -m coldstart.demo

# the real peers the tests run beside fscached (nydus-snapshotter, nerdctl, crictl, Dragonfly),
# built by name from the Go module proxy and crates.io into /var/cache/fscached/peers (or
# $FSCACHED_PEER_CACHE) when missing: coldstart/peers.py
peers: venv
	$(PY) -m coldstart.peers install

# ruff (pyproject.toml's rule set) and mypy (every package) first: a finding fails the run
lint: venv
	$(PY) -m ruff check .
	$(PY) -m mypy

test: deps venv lint peers
	$(PY) -m pytest -q

bench: deps venv
	$(PY) -m coldstart.peers install containerd-nydus-grpc nerdctl
	$(PY) bench/build.py
	$(PY) bench/fanotify.py --json bench-fanotify.json --markdown bench-fanotify.md
	$(PY) bench/serve.py
	$(PY) bench/coldstart.py --json bench-coldstart.json --markdown bench-coldstart.md --chart bench-coldstart.png

clean:
	rm -rf $(VENV) build *.egg-info
