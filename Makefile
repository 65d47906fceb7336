# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
GL     := $(BIN)/grainlab

.PHONY: run test test-slow test-load test-browser lint format setup data preview ui serve serve-recognizer bench clean

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
	@echo "Open reports/index.html (the report), or 'make ui' (MLflow at http://127.0.0.1:5000; it prints each experiment's runs-table link)."
	@echo "Metrics: '.venv/bin/dvc metrics show'; loss curves: '.venv/bin/dvc plots show'."
	@echo "Serve the champion models: 'make serve' (boundaries, port 5001), 'make serve-recognizer' (port 5002)."

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

# Both REST servers under mixed requests from 16 clients (p50/p99, throughput, peak memory), and
# 4 tuning workers starting together on an empty PostgreSQL database, 10 times.
test-load: setup
	$(BIN)/python -m pytest -m load

# After `make run`: reports/index.html and the MLflow UI in headless Chromium (never skipped here).
test-browser: setup
	GRAINLAB_REQUIRE_BROWSER=1 $(BIN)/python -m pytest -m browser

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

# Servers bind to 127.0.0.1 only; set HOST=0.0.0.0 to expose them on purpose.
HOST ?= 127.0.0.1
TRACKING := sqlite:///$(CURDIR)/mlflow.db

UI_PORT ?= 5000
ui: setup
	@$(BIN)/python -c "from grainlab import tracking; print('MLflow runs tables:', *tracking.ui_links('http://$(HOST):$(UI_PORT)'), sep='\n  ')"
	$(BIN)/mlflow ui --backend-store-uri $(TRACKING) --default-artifact-root $(CURDIR)/mlruns --host $(HOST) --port $(UI_PORT)

serve: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI=$(TRACKING) $(BIN)/mlflow models serve -m models:/grain-boundary-unet@champion --env-manager local --host $(HOST) --port 5001

serve-recognizer: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI=$(TRACKING) $(BIN)/mlflow models serve -m models:/microstructure-recognizer@champion --env-manager local --host $(HOST) --port 5002

# The benchmark suite: a table, and every figure in benchmarks/results.json. BENCH="--quick" for a smoke run.
bench: setup
	$(BIN)/python -m benchmarks $(BENCH)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
