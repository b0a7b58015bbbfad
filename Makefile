# tierbase: copy-on-write branches of a real PostgreSQL.
SHELL := /bin/bash
PYTHON ?= python3
export TIERBASE_DEMO_HOME ?= /tmp/tierbase-demo

.PHONY: install deps demo test test-unit lint bench bench-proxy bench-proxy-quick clean

deps:            ## Debian packages: postgres (+ wal2json, for rollback replay), btrfs-progs, pgbouncer (proxy bench)
	@scripts/install-deps.sh

install: deps    ## tierbase and its test tools into the current Python (+ one the service user can run)
	$(PYTHON) -m pip install -q -e '.[test]'
	PYTHON=$(PYTHON) scripts/service-python.sh

demo: install    ## start a platform on the best storage available and walk through branching
	scripts/demo.sh
	examples/inventory/demo.sh

lint:
	$(PYTHON) -m ruff check tierbase tests bench
	$(PYTHON) -m mypy tierbase

test: install lint  ## everything the CI runs
	$(PYTHON) -m pytest -q

test-unit:       ## the control plane on the fake provider, the layer, settings and schema checks: no root, seconds
	$(PYTHON) -m pytest -q tests/test_control_fake.py tests/test_layers.py tests/test_settings.py tests/test_schema.py

bench: install   ## benchmarks (as root); results in bench/results, table in docs/benchmarks.md
	$(PYTHON) bench/branching.py --sizes-mb 10,1000
	$(PYTHON) bench/proxy.py --out bench/results/proxy.json
	$(PYTHON) bench/report.py

bench-proxy: install  ## the proxy benchmark alone, through `tierbase up` (~9 min, as root; a quiet machine)
	$(PYTHON) bench/proxy.py --out bench/results/proxy.json

bench-proxy-quick: install  ## a dry run of it (~2 min); results in /tmp, the page is left alone
	$(PYTHON) bench/proxy.py --quick
