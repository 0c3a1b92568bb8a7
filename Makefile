# `make demo` and `make test` each work in one step on a fresh machine: the environment is created and
# the package installed first when missing (or when pyproject.toml changed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench bench-peer clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# For a maintainer editing one module: the suite less the tests marked slow (under 90 s on 2 cores).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	FITNETS=$(BIN)/fitnets PYTHON=$(BIN)/python sh scripts/demo.sh

bench: $(STAMP)
	$(BIN)/python scripts/bench.py --json bench.json

# fitnets against torchdistill's own loop on the same work (scripts/bench_peer.py); torchdistill installed on demand.
bench-peer: $(STAMP)
	$(BIN)/python -c "import torchdistill" 2>/dev/null || $(BIN)/python -m pip install --quiet -e '.[peer]'
	$(BIN)/python scripts/bench_peer.py --json docs/bench/peer_cpu.json

clean:
	rm -rf $(VENV) runs multirun teachers
