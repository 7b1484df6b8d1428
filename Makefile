# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs prunekit with what it needs on first use.

VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: demo test bench-throughput clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prunekit demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n auto --dist loadfile

bench-throughput: $(STAMP)
	$(VENV)/bin/python benchmarks/throughput.py --data-dir ../shared/data

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
