PYTHON ?= python3

.PHONY: install test test-fast bench demo

install:
	$(PYTHON) -m pip install -e '.[test]'

# The one test command: README and .ci/run both call `make test`.
test: install
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"

bench:
	$(PYTHON) bench/index_speed.py

# Offline: generates a captioned world, indexes it with the project's tiny CLIP (tests/assets) and runs example queries.
demo:
	$(PYTHON) -m clipsearch.demo --out indexes/demo
