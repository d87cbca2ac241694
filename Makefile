# Patchwork: `make serve` on a fresh machine sets everything up, trains the
# default BLT, CM3Leon and MAViL checkpoints when they are missing and serves
# them on 127.0.0.1:9010 (and :9000 through Ray Serve's proxy); `make test` runs the suite.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PATCHWORK := $(VENV)/bin/patchwork
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
# The load test's RPCs and weights (`patchwork loadtest run --help`); all: every served family's.
MIX ?= all
TARGET ?= 127.0.0.1:$(DIRECT_GRPC_PORT)

# Every install takes its versions from the committed locks (locks/*.txt, written by
# `make lock`); Patchwork itself goes in editable, without dependencies of its own.
# pip compiles the installed files to bytecode one at a time (about 45 s of the first
# `make serve` here); compileall does it on every core. A file written for a newer
# Python fails to compile there as under pip and is left as source (-qq, || true).
COMPILE := $(PY) -m compileall -qq -j 0 $(VENV)/lib || true
LOCK_VENV := .venv-lock
PIP_TOOLS := pip-tools==7.7.0
# `make lock UPGRADE=name[,name]` moves those packages to their newest allowed
# versions, `make lock UPGRADE=all` every package; plain `make lock` keeps every pin
# that pyproject.toml still allows and adds only what is new.
UPGRADE ?=
comma := ,
LOCK_FLAGS := --quiet --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links \
	$(if $(filter all,$(UPGRADE)),--upgrade,$(addprefix --upgrade-package ,$(subst $(comma), ,$(UPGRADE))))

.PHONY: setup protos serve train test test-fast loadtest bench lock clean

# What serving, training and the benchmarks need; `make test` adds the test tools.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml locks/serve.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --no-compile -r locks/serve.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	$(COMPILE)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed $(VENV)/.installed-system locks/test.txt
	$(PY) -m pip install --no-compile -r locks/test.txt
	$(COMPILE)
	touch $@

# Debian packages the security tests use: NGINX (TLS for clients, `serve up --tls-cert`)
# and iproute2 (network namespaces, ss).
$(VENV)/.installed-system: $(VENV)/.installed
	command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light iproute2)
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed locks/bench.txt
	$(PY) -m pip install --no-compile -r locks/bench.txt
	$(COMPILE)
	touch $@

# Rewrites the locks from pyproject.toml's ranges, each install set from the one
# before it so that a package has one version in all three. torch is written
# without a local version label: pip takes the CPU build where one lies on disk
# (machines without a GPU) and PyPI's CUDA build elsewhere.
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install $(PIP_TOOLS))
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) -o locks/serve.txt pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) --extra test -c locks/serve.txt \
		-o locks/test.txt pyproject.toml
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile $(LOCK_FLAGS) --extra bench -c locks/test.txt \
		-o locks/bench.txt pyproject.toml
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' locks/*.txt

# Regenerates the committed gRPC stubs after a .proto changes.
protos: setup
	$(PY) protos/generate.py

$(DEFAULT_CHECKPOINT)/manifest.json: | setup
	$(PATCHWORK) train blt --preset default --out $(DEFAULT_CHECKPOINT)

$(CM3LEON_CHECKPOINT)/manifest.json: | setup
	$(PATCHWORK) train cm3leon --preset default --out $(CM3LEON_CHECKPOINT)

$(MAVIL_TEACHER)/manifest.json: | setup
	$(PATCHWORK) train mavil --stage 1 --preset default --out $(MAVIL_TEACHER)

$(MAVIL_CHECKPOINT)/manifest.json: | $(MAVIL_TEACHER)/manifest.json
	$(PATCHWORK) train mavil --stage 2 --preset default --teacher $(MAVIL_TEACHER) --out $(MAVIL_CHECKPOINT)

train: $(DEFAULT_CHECKPOINT)/manifest.json $(CM3LEON_CHECKPOINT)/manifest.json $(MAVIL_CHECKPOINT)/manifest.json

serve: setup train
	$(PATCHWORK) serve up --checkpoints $(CHECKPOINTS) --grpc-port $(GRPC_PORT) --direct-grpc-port $(DIRECT_GRPC_PORT)

test: $(VENV)/.installed-test
	$(PY) -m pytest

# The inner loop: every test that needs neither a trained checkpoint nor the test server.
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -m "not checkpoints and not server"

# Locust against a running server (one is started on $(CHECKPOINTS) if none answers),
# calling the RPCs of every family it serves (unless MIX says otherwise).
loadtest: setup train
	$(PATCHWORK) loadtest run --target $(TARGET) --users $(USERS) --duration $(DURATION) --mix $(MIX) \
		--start-if-down $(CHECKPOINTS) --out results/loadtest/users_$(USERS)

# The BLT generation benchmark (docs/benchmarks.md), CM3Leon's evaluation
# (docs/cm3leon.md; it records the best decoding in the checkpoint), MAViL's tower
# check, evaluation and speed (docs/mavil.md), and the dense-versus-MoT study with the
# MoT step benchmark (docs/mot.md).
bench: $(VENV)/.installed-bench train
	$(PATCHWORK) bench blt --checkpoint $(DEFAULT_CHECKPOINT) --json results/bench.json
	$(PATCHWORK) eval cm3leon --checkpoint $(CM3LEON_CHECKPOINT) --record --json results/cm3leon.json \
		--markdown results/cm3leon.md --grid results/cm3leon-grid.png
	$(PATCHWORK) eval mavil --towers --json results/mavil-towers.json
	$(PATCHWORK) eval mavil --model stage-1=$(MAVIL_TEACHER) --model stage-2=$(MAVIL_CHECKPOINT) \
		--json results/mavil.json --markdown results/mavil.md
	$(PATCHWORK) bench mavil --checkpoint $(MAVIL_CHECKPOINT) --serve --json results/mavil-bench.json
	$(PATCHWORK) train mot-study --preset default --out results/mot-study
	$(PATCHWORK) bench mot --json results/mot-bench.json

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache
