PYTHON ?= python3

.PHONY: install test test-fast bench

install:
	$(PYTHON) -m pip install -e '.[test]'

# The one test command: README and .ci/run both call `make test`.
test: install
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

bench:
	$(PYTHON) bench/index_speed.py
