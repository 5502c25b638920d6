# medledger — one command to set up and run each job. Everything installs into
# the project (.venv, .tools) and is skipped when already present.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST  := $(BIN)/python -m pytest

.PHONY: install cometbft proto chromium synthea synthea-if-java demo test test-unit \
        test-integration test-network test-browser bench lint clean

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

# Synthea 3.3.0 (Maven Central, into .tools/synthea) and its fixed-seed population
# (.tools/synthea-data/p5-s42: 9 patients + hospital/practitioner batches), both cached.
synthea:
	$(PY) scripts/synthea_generate.py

# Tests skip real-data cases without Java; everything else about Synthea must work.
synthea-if-java:
	@if command -v java >/dev/null 2>&1; then $(PY) scripts/synthea_generate.py; \
	else echo "java not found: tests that need Synthea output will be skipped"; fi

SYNTHEA_DIR := .tools/synthea-data/p5-s42/fhir

demo: install synthea
	$(BIN)/medledger demo --synthea $(SYNTHEA_DIR)

test: install chromium synthea-if-java
	$(PYTEST) -q -p no:cacheprovider tests

test-unit: $(STAMP) synthea-if-java
	$(PYTEST) -q tests/unit

test-integration: install synthea-if-java
	$(PYTEST) -q tests/integration -m "not network and not browser"

test-network: install
	$(PYTEST) -q -m network tests/integration

test-browser: install chromium
	$(PYTEST) -q -m browser tests/integration

# bench.synthea_import: a 50-patient Synthea population and the largest patient of the
# default one (34,613 resources, 86 MB), embedded and on 4 validators (issue 10).
bench: install synthea
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.flood
	$(BIN)/python -m bench.flood --reader-rate 0
	$(BIN)/python -m bench.synthea_import --network

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) .tools .demo test-artifacts
