# Two commands do all set-up on a fresh Debian 12 machine (as root):
#   make demo   set-up, then the end-to-end demo: real guests live-migrate under QEMU
#   make demo-netns   the namespace-only demo (a namespace stands in for the VM)
#   make test   set-up, then every test (unit tests and kernel tests in namespaces)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-netns test unit netns lint bench clean

setup:
	@bash scripts/setup

demo: setup
	$(VENV)/bin/xfer lab demo --guest

demo-netns: setup
	$(VENV)/bin/xfer lab demo --namespaces

test: setup
	$(PY) -m pytest -q

unit: setup
	$(PY) -m pytest -q tests

netns: setup
	$(PY) -m pytest -q netns_tests

lint: setup
	$(VENV)/bin/ruff check xfer tests netns_tests
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/xfer bench conntrack

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
