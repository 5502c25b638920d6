# medledger — one command to set up and run each job. Everything installs into
# the project (.venv, .tools) and is skipped when already present.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST  := $(BIN)/python -m pytest

.PHONY: install cometbft proto chromium demo test test-unit test-integration test-network \
        test-browser bench lint clean

install: $(STAMP) cometbft proto

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

cometbft:
	scripts/install_cometbft.sh

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

chromium:
	scripts/install_chromium.sh

demo: install
	$(BIN)/medledger demo

test: install chromium
	$(PYTEST) -q -p no:cacheprovider tests

test-unit: $(STAMP)
	$(PYTEST) -q tests/unit

test-integration: install
	$(PYTEST) -q tests/integration -m "not network and not browser"

test-network: install
	$(PYTEST) -q -m network tests/integration

test-browser: install chromium
	$(PYTEST) -q -m browser tests/integration

bench: install
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.flood

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) .tools .demo test-artifacts
