# make demo  - the machinery example on the embedded SQLite default (no server needed)
# make test  - the whole test suite, against real Redis and RabbitMQ on 127.0.0.1
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test services browser bench clean

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

test: $(STAMP) services browser
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(STAMP) services
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) .nbqueue examples/.nbqueue
