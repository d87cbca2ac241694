# Patchwork: `make serve` on a fresh machine sets everything up, trains the
# default BLT, CM3Leon and MAViL checkpoints when they are missing and serves
# them on 127.0.0.1:9010 (and :9000 through Ray Serve's proxy); `make test` runs the suite.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CHECKPOINTS ?= checkpoints
DEFAULT_CHECKPOINT := $(CHECKPOINTS)/blt-default
CM3LEON_CHECKPOINT := $(CHECKPOINTS)/cm3leon-default
MAVIL_CHECKPOINT := $(CHECKPOINTS)/mavil-default
# MAViL's stage-1 teacher, outside $(CHECKPOINTS) so that it is not served.
MAVIL_TEACHER ?= teachers/mavil-stage1
GRPC_PORT ?= 9000
DIRECT_GRPC_PORT ?= 9010

USERS ?= 16
DURATION ?= 60s
TARGET ?= 127.0.0.1:$(DIRECT_GRPC_PORT)

.PHONY: setup protos serve train test loadtest bench clean

# What serving, training and the benchmarks need; `make test` adds the test tools.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install -e '.[bench]'
	touch $@

# Regenerates the committed gRPC stubs after a .proto changes.
protos: setup
	$(PY) protos/generate.py

$(DEFAULT_CHECKPOINT)/manifest.json: | setup
	$(PY) -m training blt --preset default --out $(DEFAULT_CHECKPOINT)

$(CM3LEON_CHECKPOINT)/manifest.json: | setup
	$(PY) -m training cm3leon --preset default --out $(CM3LEON_CHECKPOINT)

$(MAVIL_TEACHER)/manifest.json: | setup
	$(PY) -m training mavil --stage 1 --preset default --out $(MAVIL_TEACHER)

$(MAVIL_CHECKPOINT)/manifest.json: | $(MAVIL_TEACHER)/manifest.json
	$(PY) -m training mavil --stage 2 --preset default --teacher $(MAVIL_TEACHER) --out $(MAVIL_CHECKPOINT)

train: $(DEFAULT_CHECKPOINT)/manifest.json $(CM3LEON_CHECKPOINT)/manifest.json $(MAVIL_CHECKPOINT)/manifest.json

serve: setup train
	$(PY) -m serving up --checkpoints $(CHECKPOINTS) --grpc-port $(GRPC_PORT) --direct-grpc-port $(DIRECT_GRPC_PORT)

test: $(VENV)/.installed-test
	$(PY) -m pytest

# Locust against a running server (one is started on $(CHECKPOINTS) if none answers).
loadtest: setup train
	$(PY) -m loadtests run --target $(TARGET) --users $(USERS) --duration $(DURATION) \
		--start-if-down $(CHECKPOINTS) --out results/loadtest/users_$(USERS)

# The BLT generation benchmark (docs/benchmarks.md), CM3Leon's evaluation
# (docs/cm3leon.md), MAViL's evaluation and speed (docs/mavil.md), and the
# dense-versus-MoT study with the MoT step benchmark (docs/mot.md).
bench: $(VENV)/.installed-bench train
	$(PY) -m engines.blt.bench --checkpoint $(DEFAULT_CHECKPOINT) --json results/bench.json
	$(PY) -m training.cm3leon.evaluate --checkpoint $(CM3LEON_CHECKPOINT) --json results/cm3leon.json \
		--markdown results/cm3leon.md --grid results/cm3leon-grid.png
	$(PY) -m training.mavil.evaluate --model stage-1=$(MAVIL_TEACHER) --model stage-2=$(MAVIL_CHECKPOINT) \
		--json results/mavil.json --markdown results/mavil.md
	$(PY) -m engines.mavil.bench --checkpoint $(MAVIL_CHECKPOINT) --serve --json results/mavil-bench.json
	$(PY) -m training mot-study --preset default --out results/mot-study
	$(PY) -m engines.mot.bench --json results/mot-bench.json

clean:
	rm -rf $(VENV) .pytest_cache
