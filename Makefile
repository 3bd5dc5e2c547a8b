# make demo  - the machinery example on the embedded SQLite default (no server needed)
# make test  - the whole test suite, against real Redis and RabbitMQ on 127.0.0.1, in TEST_WORKERS (4) pytest-xdist
#             processes; each process starts moto's SQS server and memcached itself, each on a free 127.0.0.1 port
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test services browser memcached bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	cd examples && ../$(PY) sum.py

services:
	bash .ci/services

# Debian's Chromium for tests/test_browser.py (Playwright drives it; no browser download)
browser:
	test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

# Debian's memcached for the Memcache result backend's tests (the test session starts it on a free port)
memcached:
	command -v memcached >/dev/null || test -x /usr/bin/memcached || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q memcached)

# The suite mostly waits (servers, leases, child processes), so it runs in more worker processes
# (pytest-xdist) than the machine has cores; tests that must not overlap share an xdist_group.
TEST_WORKERS ?= 4

test: $(STAMP) services browser memcached
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP) services memcached
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) .nbqueue examples/.nbqueue
