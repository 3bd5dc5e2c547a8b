# make demo  - the machinery example on the embedded SQLite default (no server needed)
# make lint  - ruff (style, imports, complexity), lint-imports (DESIGN.md's layering) and mypy (typed modules)
# make test  - `make lint` first, then the whole test suite, against real Redis and RabbitMQ on 127.0.0.1, in
#             TEST_WORKERS (4) pytest-xdist processes; each process starts moto's SQS server and memcached itself,
#             each on a free 127.0.0.1 port
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint services browser memcached bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# the demo needs only nbqueue itself (no test tools, no servers)
$(VENV)/.installed-base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

demo: $(VENV)/.installed-base
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

test: $(STAMP) lint services browser memcached
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# the modules mypy checks: the canvas and workflow, the protocol and engine modules where they exist,
# what the protocols share below them (urls, wakeups, options), the embedded default's driver (SQLite) and RabbitMQ's
MYPY_FILES = $(sort $(wildcard nbqueue/canvas.py nbqueue/context.py nbqueue/workflow.py nbqueue/message.py nbqueue/broker.py \
                        nbqueue/urls.py nbqueue/wakeups.py nbqueue/options.py \
                        nbqueue/backend.py nbqueue/engine.py nbqueue/drivers/__init__.py nbqueue/drivers/*/engine.py \
                        nbqueue/drivers/sqlite/*.py nbqueue/drivers/amqp/*.py))

# every check runs, and the target fails if one failed
lint: $(STAMP)
	status=0; \
	$(VENV)/bin/ruff check nbqueue tests benchmarks examples || status=1; \
	$(VENV)/bin/lint-imports || status=1; \
	$(VENV)/bin/mypy $(MYPY_FILES) || status=1; \
	exit $$status

bench: $(STAMP) services memcached
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/bench.py
	$(PY) benchmarks/bench_loop.py

clean:
	rm -rf $(VENV) .nbqueue examples/.nbqueue
