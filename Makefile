# The two commands of the README: `make serve` and `make test`. Both create .venv and
# install what they need on first use; nothing else is required on the machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config.yaml

.PHONY: serve test lint bench clean

$(VENV)/.installed-serve: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed-serve

serve: $(VENV)/.installed-serve
	$(BIN)/aiproxy serve --config $(CONFIG)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests plugins
	$(BIN)/mypy

# The benchmark (needs wrk: apt-get install wrk); writes bench/RESULTS.md. BENCH_ARGS=--quick
# for a short run, BENCH_ARGS="--compare litellm" to run the LiteLLM proxy beside it, and
# "--redis-url redis://127.0.0.1:6379/14 --database-url postgresql+asyncpg://postgres@127.0.0.1/test"
# to add every stage on Redis and PostgreSQL (the bench creates the database aiproxy_bench).
bench: $(VENV)/.installed-serve
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
