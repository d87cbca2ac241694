# Patchwork: `make serve` on a fresh machine sets everything up, trains the
# default BLT and CM3Leon checkpoints when they are missing and serves both on
# 127.0.0.1:9000; `make test` runs the suite.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CHECKPOINTS ?= checkpoints
DEFAULT_CHECKPOINT := $(CHECKPOINTS)/blt-default
CM3LEON_CHECKPOINT := $(CHECKPOINTS)/cm3leon-default
GRPC_PORT ?= 9000

USERS ?= 16
DURATION ?= 60s
TARGET ?= 127.0.0.1:$(GRPC_PORT)

.PHONY: setup protos serve train test loadtest bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[test]'
	touch $@

# Regenerates the committed gRPC stubs after a .proto changes.
protos: setup
	$(PY) protos/generate.py

$(DEFAULT_CHECKPOINT)/manifest.json: | setup
	$(PY) -m training blt --preset default --out $(DEFAULT_CHECKPOINT)

$(CM3LEON_CHECKPOINT)/manifest.json: | setup
	$(PY) -m training cm3leon --preset default --out $(CM3LEON_CHECKPOINT)

train: $(DEFAULT_CHECKPOINT)/manifest.json $(CM3LEON_CHECKPOINT)/manifest.json

serve: setup train
	$(PY) -m serving up --checkpoints $(CHECKPOINTS) --grpc-port $(GRPC_PORT)

test: setup
	$(PY) -m pytest

# Locust against a running server (one is started on $(CHECKPOINTS) if none answers).
loadtest: setup train
	$(PY) -m loadtests run --target $(TARGET) --users $(USERS) --duration $(DURATION) \
		--start-if-down $(CHECKPOINTS) --out results/loadtest/users_$(USERS)

# The BLT generation benchmark (docs/benchmarks.md) and CM3Leon's evaluation (docs/cm3leon.md).
bench: setup train
	$(PY) -m engines.blt.bench --checkpoint $(DEFAULT_CHECKPOINT) --json results/bench.json
	$(PY) -m training.cm3leon.evaluate --checkpoint $(CM3LEON_CHECKPOINT) --json results/cm3leon.json \
		--markdown results/cm3leon.md --grid results/cm3leon-grid.png

clean:
	rm -rf $(VENV) .pytest_cache
