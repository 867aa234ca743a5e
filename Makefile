# wantel: `make demo` and `make test` set themselves up on a fresh clone.
# torch is installed first, from the CPU wheel, so pip never pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
DEBIAN_PACKAGES := $(shell cat scripts/debian-packages.txt 2>/dev/null | grep -v '^\#')
PYTEST_ARGS ?=

.PHONY: install demo test lint bench docs-image clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py telemetry/log/_framing.c telemetry/log/_natswire.c telemetry/eta/_live.c \
          scripts/debian-packages.txt
	scripts/install-debian-packages.sh $(DEBIAN_PACKAGES)  # first: the C accelerator needs gcc
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e '.[dev,wan]'
	touch $@

demo: install
	$(VENV)/bin/wantel demo

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The suite fails, rather than skips, if the C accelerator did not build here.
test: install lint
	WANTEL_REQUIRE_SPEEDUPS=1 $(PY) -m pytest $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/log_bench.py

# docs/live-page.png: the live page's screenshot, taken by its browser test (which otherwise
# writes only to a temporary directory).
docs-image: install
	$(PY) -m pytest -q tests/e2e/test_live_page.py --save-live-page docs/live-page.png

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
