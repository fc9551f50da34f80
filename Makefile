# The README's two commands: `make run` and `make test`. Everything else is a helper for them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build keeps a laptop install small; GPU users override: make TORCH='torch>=2.1' run
TORCH ?= torch==2.13.0

.PHONY: venv run test lint demo bench clean

$(BIN)/sdmerge: pyproject.toml setup.py merge_engine/_kernels.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[service,preview,dev]"
	touch $@

venv: $(BIN)/sdmerge

run: venv
	$(BIN)/sdmerge serve --host 127.0.0.1 --port 8000 --data-dir ./data

test: venv
	bash scripts/test.sh

lint: venv
	$(BIN)/ruff check merge_engine app worker migrations tests bench

demo: venv
	$(BIN)/sdmerge demo ./demo

clean:
	rm -rf $(VENV) data demo .pytest_cache
