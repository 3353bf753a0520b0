# Two commands on a fresh machine: `make run` and `make test`. Everything else is installed from here.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
JS     := tests/js
JSSTAMP := $(JS)/node_modules/.installed

.PHONY: run test test-soak lint format bench install node chromium clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The official Phoenix JS client (and `ws` for Node) for protocol-compatibility tests and the bench client.
node: $(JSSTAMP)

$(JSSTAMP): $(JS)/package.json $(JS)/package-lock.json
	cd $(JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(JSSTAMP)

run: $(STAMP)
	$(BIN)/viral-engine migrate
	$(BIN)/viral-engine serve --host 127.0.0.1 --port 8000 --demo

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Debian's Chromium, for the dashboards' browser tests (installed once; a no-op when present).
chromium:
	sh scripts/install-chromium.sh

test: $(STAMP) $(JSSTAMP) chromium lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The fuzzers of tests/reliability/ with ten times the examples (socket fuzz, schemathesis).
test-soak: $(STAMP) $(JSSTAMP)
	FUZZ_SCALE=10 $(PY) -m pytest tests/reliability/test_socket_fuzz.py tests/reliability/test_api_input.py $(PYTEST_ARGS)

BENCHSTAMP := $(VENV)/.installed-bench

$(BENCHSTAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(BENCHSTAMP)

bench: $(BENCHSTAMP) $(JSSTAMP)
	$(PY) -m bench.broadcast $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(JS)/node_modules .pytest_cache .mypy_cache .ruff_cache
