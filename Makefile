# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
GL     := $(BIN)/grainlab

.PHONY: run test test-slow test-load lint format setup data preview ui serve serve-recognizer bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

data: setup
	$(GL) data synth

preview: setup
	$(GL) data preview

# The whole demo: data, then every pipeline stage (dvc.yaml), then where to look.
run: setup data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@echo
	@sed -n '/^## Answers/,/^## Test/p' reports/boundaries/study.md | sed '$$d'
	@echo "Open reports/index.html (the report), or 'make ui' (MLflow runs at http://127.0.0.1:5000)."
	@echo "Metrics: '.venv/bin/dvc metrics show'; loss curves: '.venv/bin/dvc plots show'."
	@echo "Serve the champion models: 'make serve' (boundaries, port 5001), 'make serve-recognizer' (port 5002)."

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

# Both REST servers under 500 mixed requests each from 16 clients; prints p50/p99 and throughput.
test-load: setup
	$(BIN)/python -m pytest -m load

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# Servers bind to 127.0.0.1 only; set HOST=0.0.0.0 to expose them on purpose.
HOST ?= 127.0.0.1
TRACKING := sqlite:///$(CURDIR)/mlflow.db

ui: setup
	$(BIN)/mlflow ui --backend-store-uri $(TRACKING) --default-artifact-root $(CURDIR)/mlruns --host $(HOST) --port 5000

serve: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI=$(TRACKING) $(BIN)/mlflow models serve -m models:/grain-boundary-unet@champion --env-manager local --host $(HOST) --port 5001

serve-recognizer: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI=$(TRACKING) $(BIN)/mlflow models serve -m models:/microstructure-recognizer@champion --env-manager local --host $(HOST) --port 5002

# The benchmark suite: a table, and every figure in benchmarks/results.json. BENCH="--quick" for a smoke run.
bench: setup
	$(BIN)/python -m benchmarks $(BENCH)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
